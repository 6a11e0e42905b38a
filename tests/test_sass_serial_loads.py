"""scripts/sass_serial_loads.py's reading of SASS: a load used before the next load of its block is a
chain; loads issued together, then used, are not; a label starts a new block."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sass_serial_loads.py"


def scanner():
    spec = importlib.util.spec_from_file_location("sass_serial_loads", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.serial_loads


CHAINED = """\t//## File "/x/a.cuh", line 54
        /*0010*/                   LD.E R48, desc[UR14][R60.64] ;
\t//## File "/x/a.cuh", line 55
        /*0020*/                   STS [R71], R48 ;
\t//## File "/x/a.cuh", line 54
        /*0030*/                   LD.E R67, desc[UR14][R60.64+0x80] ;
\t//## File "/x/a.cuh", line 55
        /*0040*/                   STS [R71+0x80], R67 ;
"""

BATCHED = """\t//## File "/x/a.cuh", line 54
        /*0010*/                   LD.E.128 R40, desc[UR14][R60.64] ;
        /*0020*/                   LDG.E.128.CONSTANT R44, desc[UR14][R60.64+0x10] ;
\t//## File "/x/a.cuh", line 55
        /*0030*/                   STS.128 [R71], R40 ;
        /*0040*/                   STS.128 [R71+0x10], R47 ;
"""

ACROSS_A_LABEL = """\t//## File "/x/a.cuh", line 54
        /*0010*/                   LD.E R48, desc[UR14][R60.64] ;
\t//## File "/x/a.cuh", line 55
        /*0020*/                   FADD R50, R48, R48 ;
.L_x_7:
\t//## File "/x/a.cuh", line 56
        /*0030*/                   LD.E R52, desc[UR14][R60.64+0x4] ;
"""


def test_a_load_used_before_the_next_is_a_chain():
    assert scanner()(CHAINED) == {("a.cuh:54", "a.cuh:55", "a.cuh:54"): 1}


def test_loads_issued_together_and_loads_in_other_blocks_are_not():
    serial_loads = scanner()
    assert serial_loads(BATCHED) == {}
    assert serial_loads(ACROSS_A_LABEL) == {}
    # Joined, BATCHED's two loads are used before CHAINED's first load, and CHAINED's first before its second.
    assert serial_loads(BATCHED + CHAINED) == {("a.cuh:54", "a.cuh:55", "a.cuh:54"): 3}
