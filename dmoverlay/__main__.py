from dmoverlay.cli import main

main()
