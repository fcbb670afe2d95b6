from tansuo.cli import main

main()
