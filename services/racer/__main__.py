from services.racer.main import main

main()
