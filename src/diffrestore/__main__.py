from diffrestore.cli import main

raise SystemExit(main())
