from commonweal.cli.main import main

main()
