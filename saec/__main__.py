from saec.cli import main

main()
