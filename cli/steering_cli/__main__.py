import sys

from steering_cli.main import main

sys.exit(main())
