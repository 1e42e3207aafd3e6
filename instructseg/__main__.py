from instructseg.cli import main

raise SystemExit(main())
