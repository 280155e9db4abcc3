"""bench/sm90_banks.py: the bank-conflict degree that bench/SM90.md reports, on small synthetic TTGIR texts."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import sm90_banks  # noqa: E402

SMEM = {
    "unswizzled": "#ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1, order = [1, 0]}>",
    "swizzled": "#ttg.swizzled_shared<{vec = 8, perPhase = 1, maxPhase = 8, order = [1, 0]}>",
    "nvmma": "#ttg.nvmma_shared<{swizzlingByteWidth = 128, transposed = false, elementBitWidth = 16}>",
}
REGS = {
    # one row per lane: lanes 128 B apart (64 bf16 per row), one element per access
    "row_per_lane": "#ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [32, 1], warpsPerCTA = [4, 1], "
                    "order = [1, 0]}>",
    # one row per lane, 8 consecutive bf16 per lane: 16-byte accesses, 8 lanes per pass, still 128 B apart
    "row_per_lane_vec8": "#ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [32, 1], warpsPerCTA = [4, 1], "
                         "order = [1, 0]}>",
    # 8 lanes along a row, 16 bytes each: a quarter-warp reads one whole 128-byte row
    "coalesced": "#ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], "
                 "order = [1, 0]}>",
    # every lane of a warp reads the same element (a broadcast), each warp its own row
    "broadcast": "#ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1], "
                 "order = [0, 1]}>",
}


def ttgir(smem: str, regs: str, shape: str = "128x64", in_loop: bool = True) -> str:
    load = (f"      %a = ttg.local_load %buf token %t : !ttg.memdesc<{shape}xbf16, #shared, #smem, mutable> "
            f"-> tensor<{shape}xbf16, #blocked>")
    outside = "" if in_loop else load.replace("%a", "%early") + "\n"
    inside = load + "\n" if in_loop else ""
    return (f"#blocked = {regs}\n#shared = {smem}\n#smem = #ttg.shared_memory\n"
            "module {\n  tt.func public @k() {\n" + outside +
            "    %r = scf.for %i = %c0 to %c4 step %c1 iter_args(%acc = %z) -> (tensor<128x128xf32, #mma>) : i32 {\n"
            + inside +
            "      %d = ttng.warp_group_dot %x, %y, %acc {isAsync = true} : tensor<128x64xbf16> * "
            "!ttg.memdesc<64x128>\n"
            "      scf.yield %d : tensor<128x128xf32, #mma>\n    }\n    tt.return\n  }\n}\n")


@pytest.mark.parametrize("smem, regs, degree, access", [
    ("unswizzled", "row_per_lane", 32, 2),       # the old kernels' W-tile read: all 32 lanes on one bank
    ("unswizzled", "row_per_lane_vec8", 8, 16),  # 8 lanes per pass, all on banks 0-3
    ("swizzled", "row_per_lane_vec8", 1, 16),    # the XOR swizzle spreads those 8 rows over all 32 banks
    ("swizzled", "coalesced", 1, 16),
    ("unswizzled", "coalesced", 1, 16),
    ("unswizzled", "broadcast", 1, 2),           # one word for the whole warp: no conflict
])
def test_conflict_degree_of_swizzled_loads(smem, regs, degree, access):
    (load,) = sm90_banks.local_loads(ttgir(SMEM[smem], REGS[regs]))
    assert load["shape"] == [128, 64] and load["smem_kind"] == "swizzled_shared"
    assert (load["degree"], load["access_bytes"]) == (degree, access)


def test_nvmma_source_read_into_blocked_registers_is_counted_not_assumed():
    # one row per lane through the 128-byte NVMMA swizzle: 8 phases spread the 32 lanes over 8 bank groups
    (load,) = sm90_banks.local_loads(ttgir(SMEM["nvmma"], REGS["row_per_lane"]))
    assert (load["smem_kind"], load["degree"], load["access_bytes"]) == ("nvmma_shared", 4, 2)
    (load,) = sm90_banks.local_loads(ttgir(SMEM["nvmma"], REGS["coalesced"]))
    assert load["degree"] == 1 and "nvmma" in load["why"]


def test_unknown_layouts_are_not_given_a_number():
    linear = "#ttg.linear<{register = [[0, 1]], lane = [[1, 0]], warp = [[2, 0]], block = []}>"
    (load,) = sm90_banks.local_loads(ttgir(SMEM["unswizzled"], linear))
    assert load["degree"] is None and "not analysed" in load["why"]
    assert "not analysed" in sm90_banks.cell([load], 128, 64, 64)


def test_only_loads_of_the_dot_loop_count():
    assert sm90_banks.local_loads(ttgir(SMEM["unswizzled"], REGS["row_per_lane"], in_loop=False)) == []
    assert sm90_banks.local_loads("no loop here") == []


def test_blocked_coords_follow_order_and_size_per_thread():
    layout = sm90_banks.parse_layouts(ttgir(SMEM["swizzled"], REGS["coalesced"]))["blocked"]
    assert sm90_banks.regs_per_thread(layout, [128, 64]) == 64  # 128 x 64 over 128 threads
    assert sm90_banks.blocked_coords(layout, [128, 64], lane=0, warp=0, reg=3) == (0, 3)
    assert sm90_banks.blocked_coords(layout, [128, 64], lane=9, warp=1, reg=0) == (4 + 1, 8)
    assert sm90_banks.blocked_coords(layout, [128, 64], lane=0, warp=0, reg=8) == (16, 0)  # next repeat: rows


def test_swizzle_xors_vector_groups_with_the_row_phase():
    shared = sm90_banks.parse_layouts(ttgir(SMEM["swizzled"], REGS["coalesced"]))["shared"]
    assert sm90_banks.swizzled_offset(shared, [128, 64], (0, 9)) == 9
    assert sm90_banks.swizzled_offset(shared, [128, 64], (3, 9)) == 3 * 64 + (1 ^ 3) * 8 + 1


def test_cell_names_the_w_tile_and_says_when_it_never_passes_through_shared_memory():
    nvmma = sm90_banks.local_loads(ttgir(SMEM["nvmma"], REGS["coalesced"], shape="128x64"))
    # BLOCK_M 256, BLOCK_N 128, BLOCK_K 64: 128x64 can only be the W tile
    assert sm90_banks.cell(nvmma, 256, 128, 64) == "W 128x64: 1 (nvmma, 16 B)"
    # BLOCK_N 64: the 128x64 tile is x, the W tile is never loaded from shared memory
    assert sm90_banks.cell(nvmma, 128, 64, 64) == "W: none (regs); x 128x64: 1 (nvmma, 16 B)"
    assert sm90_banks.cell(nvmma, 128, 128, 64, w_role="x").startswith("W: none (regs); x 128x64")
    assert sm90_banks.tile_role([64, 128], 256, 128, 64) == "W"
    assert sm90_banks.tile_role([128, 64], 128, 128, 64) == "W|x"


@pytest.mark.parametrize("smem, degree", [
    ("swizzled", 1),  # 8 rows of 128 B, their 16-byte chunks XOR-ed apart: one pass per 8x8 matrix
    ("swizzled_vec8_no_phase", 8),  # the same rows unswizzled: all 8 on banks 0-3
    ("nvmma", 1),
    ("nvmma_no_swizzle", 8),
    ("unswizzled", 8),  # vec = 1 but 16 contiguous bytes per row: still ldmatrix, still 8-way
])
def test_ldmatrix_reads_into_dot_operands(smem, degree):
    smem_layouts = dict(SMEM, swizzled_vec8_no_phase=SMEM["swizzled"].replace("maxPhase = 8", "maxPhase = 1"),
                        nvmma_no_swizzle=SMEM["nvmma"].replace("= 128", "= 0"))
    dot = "#ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>"
    text = ttgir(smem_layouts[smem], REGS["coalesced"]).replace("xbf16, #blocked>", f"xbf16, {dot}>")
    (load,) = sm90_banks.local_loads(text)
    assert (load["reg_kind"], load["degree"], load["access_bytes"]) == ("dot_op", degree, "ldmatrix")


def test_nvmma_offsets_swizzle_16_byte_chunks_by_row():
    shared = {"kind": "nvmma_shared", "swizzlingByteWidth": "128", "transposed": "false"}
    assert sm90_banks.nvmma_offset(shared, [128, 64], (0, 9), 2) == 9
    assert sm90_banks.nvmma_offset(shared, [128, 64], (3, 9), 2) == 3 * 64 + (1 ^ 3) * 8 + 1
    # 128 columns of bf16 = two 128-byte swizzle tiles, the second after all rows of the first
    assert sm90_banks.nvmma_offset(shared, [16, 128], (0, 64), 2) == 16 * 64
    transposed = dict(shared, transposed="true")
    assert sm90_banks.nvmma_offset(transposed, [64, 128], (9, 0), 2) == 9


def test_w_degree_reads_the_w_tile_out_of_a_cell():
    assert sm90_banks.w_degree("W 128x64: 1 (swizzled, ldmatrix); vec 1x64: not analysed (swizzled)") == 1
    assert sm90_banks.w_degree("W 128x64: 32 (swizzled, 2 B); x 128x64: 1 (nvmma, ldmatrix)") == 32
    assert sm90_banks.w_degree("W: none (regs); x 128x64: 1 (nvmma, ldmatrix)") == 0
    assert sm90_banks.w_degree("W 128x64: not analysed (linear)") is None
    assert sm90_banks.w_degree("") is None
