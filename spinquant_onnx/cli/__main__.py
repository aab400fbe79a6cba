import sys

from spinquant_onnx.cli import main

sys.exit(main())
