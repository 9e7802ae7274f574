from medrl.cli import main

raise SystemExit(main())
