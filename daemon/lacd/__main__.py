from lacd.cli import main

main()
