from bdc._cli import main

main()
