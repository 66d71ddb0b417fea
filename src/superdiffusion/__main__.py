from superdiffusion.cli.main import main

raise SystemExit(main())
