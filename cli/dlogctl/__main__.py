from dlogctl.main import main

main()
