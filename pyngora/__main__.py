from pyngora.cli import main

main()
