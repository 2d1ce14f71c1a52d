from services.compressor.main import main

main()
