from rlhf_dist.cli import main

raise SystemExit(main())
