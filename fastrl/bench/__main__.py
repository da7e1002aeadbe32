import sys

from fastrl.bench import main

sys.exit(main())
