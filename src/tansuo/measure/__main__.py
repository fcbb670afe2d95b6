from tansuo.measure.run import main

main()
