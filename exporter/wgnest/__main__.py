from wgnest.cli import main

raise SystemExit(main())
