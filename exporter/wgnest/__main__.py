from wgnest.runtime.cli import main

raise SystemExit(main())
