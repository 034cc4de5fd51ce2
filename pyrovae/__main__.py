from pyrovae.cli import main

raise SystemExit(main())
