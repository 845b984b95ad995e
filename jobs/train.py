"""`ray job submit ... -- python jobs/train.py --data s3://... --storage s3://...`

The same options as `tl-ray train` (this is that command, run as a Ray job on the
cluster it was submitted to); exits non-zero when the run fails.
"""

import sys

from tl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
