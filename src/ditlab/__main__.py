import sys

from ditlab.cli import main

sys.exit(main())
