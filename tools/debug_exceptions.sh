#!/usr/bin/env bash
# Device probe: does an error raised inside libfp4 survive with torch loaded?
env | grep -iE "LDFLAGS|CXXFLAGS|CFLAGS|CMAKE" ; readelf -d /tmp/site/fp4/libfp4.so | grep NEEDED
python -c "
import torch
from fp4 import _C
try:
    _C.set_num_threads(0)
except ValueError as e:
    print('   ok:', e)" || echo "   crashed rc=$?"
