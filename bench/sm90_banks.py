"""Bank-conflict degree of the shared-to-register loads in a kernel's TTGIR main loop (sm_90, no GPU needed).

Every ``ttg.local_load`` inside the K loop (the ``scf.for`` holding ``ttng.warp_group_dot`` / ``tt.dot``) reads a
tile from shared memory into registers. Its cost depends on how the 32 lanes of a warp hit the 32 four-byte
banks of shared memory: a warp-level load takes as many passes (wavefronts) as the largest number of
*distinct* 4-byte words any one bank must deliver (lanes reading the same word are served by one broadcast).
That number is the conflict degree reported here: 1 = conflict-free, 32 = fully serialized.

How the degree is derived (the method of the sm_90 audit's TTGIR analysis, /work/shared/GPU_AUDIT.md):

* Shared side: a ``swizzled_shared`` buffer (vec, perPhase, maxPhase, order: groups of ``vec`` elements along
  the fast dim XOR-ed with the row's phase) or an ``nvmma_shared`` one (the TMA / wgmma swizzle: 16-byte
  chunks XOR-ed with address bits 7 and up, in swizzle-wide column tiles) maps tile coordinates to bytes.
* Into a ``blocked`` register layout (an ``ld.shared`` per group of a thread's registers, the same for all
  lanes): map every lane's element coordinates through the buffer and count distinct words per bank. The
  vector width is the thread's sizePerThread run along the buffer's fast dim, up to 16 bytes, as long as it
  lies contiguous and aligned in shared memory (the audit's model; the lowering may also fuse registers of
  consecutive layout repeats into one wider access, which this does not model: the W-tile loads of the
  current kernels already hold 16 bytes per thread there, the widest access). A 16-byte access is served
  a quarter-warp (8 lanes) at a time, an 8-byte one a half-warp at a time (the hardware's passes), so the
  degree is counted per pass: 1 still means conflict-free.
* Into an MMA dot-operand layout (16-bit elements): the lowering reads with ``ldmatrix`` (``.trans`` when the
  buffer's fast dim is the operand's M / N): per 8x8 matrix, 8 lanes' 16-byte rows at 8 consecutive indices
  of the buffer's slow dim, one pass. The NVMMA swizzle and the vec = 8, maxPhase = 8 swizzle exist to make
  exactly these reads conflict-free; the degree is counted all the same, not assumed.
* Anything else (another shared or register layout kind, 32-bit vectors into dot operands, a rank above 2):
  reported as not analysed, never as a number.

Usage::

    from sm90_banks import local_loads
    for load in local_loads(compiled.asm["ttgir"]):
        print(load["shape"], load["smem_kind"], load["degree"], load["why"])
"""

from __future__ import annotations

import collections
import json
import re

BANKS, BANK_BYTES, WARP = 32, 4, 32
ELEM_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i8": 1, "i16": 2, "i32": 4, "f8E4M3FN": 1, "f8E5M2": 1, "i1": 1}
# lanes served together by one shared-memory pass for a per-lane access of this many bytes
LANES_PER_PHASE = {1: 32, 2: 32, 4: 32, 8: 16, 16: 8}

_LAYOUT = re.compile(r"^#(\w+) = #ttg\.(\w+)<\{(.*)\}>", re.M)
_FIELD = re.compile(r"(\w+) = (\[[^\]]*\]|[\w.]+)")
# %r = ttg.local_load %buf [token %t] : !ttg.memdesc<SHAPExT, #shared, #smem, ...> -> tensor<SHAPExT, LAYOUT>
_LOCAL_LOAD = re.compile(
    r"ttg\.local_load\s+%[\w#]+(?:\s+token\s+%[\w#]+)?\s*:\s*!ttg\.memdesc<((?:\d+x)+)(\w+),\s*#(\w+),\s*#smem[^>]*>"
    r"\s*->\s*tensor<(?:\d+x)+\w+,\s*(#\w+(?:\.\w+<\{[^}]*\}>)?)"
)


def parse_layouts(ttgir: str) -> dict:
    """``{alias: {"kind": ..., field: value}}`` for every ``#alias = #ttg.kind<{...}>`` line of the module."""
    layouts = {}
    for name, kind, body in _LAYOUT.findall(ttgir):
        fields = {"kind": kind}
        for key, value in _FIELD.findall(body):
            try:  # flat lists (sizePerThread, order, ...); nested ones (linear layouts) stay text: not needed
                fields[key] = json.loads(value) if value.startswith("[") else value
            except ValueError:
                fields[key] = value
        layouts[name] = fields
    return layouts


def main_loop(ttgir: str) -> str:
    """Text of the first ``scf.for`` whose body holds a dot ("" when there is none)."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for inner in lines[i:]:
            depth += inner.count("{") - inner.count("}")
            body.append(inner)
            if depth <= 0 and len(body) > 1:
                break
        text = "\n".join(body)
        if "warp_group_dot" in text or "tt.dot" in text:
            return text
    return ""


def _reps(layout: dict, shape) -> list:
    """How often the layout's CTA tile repeats along each dim (1 when the tile is smaller: lanes broadcast)."""
    spt, tpw, wpc = layout["sizePerThread"], layout["threadsPerWarp"], layout["warpsPerCTA"]
    return [max(1, shape[d] // (spt[d] * tpw[d] * wpc[d])) for d in range(len(shape))]


def regs_per_thread(layout: dict, shape) -> int:
    """Elements one thread holds of a ``shape`` tensor in a blocked layout."""
    n = 1
    for d, rep in enumerate(_reps(layout, shape)):
        n *= layout["sizePerThread"][d] * rep
    return n


def blocked_coords(layout: dict, shape, lane: int, warp: int, reg: int) -> tuple:
    """Tensor coordinates of register ``reg`` of ``lane`` in ``warp`` (blocked layout: a thread's
    sizePerThread elements vary fastest, along ``order``, then the layout's repeats, along ``order``)."""
    spt, tpw, wpc, order = layout["sizePerThread"], layout["threadsPerWarp"], layout["warpsPerCTA"], layout["order"]
    rank = len(shape)
    lane_c, warp_c, elem_c, rep_c = [0] * rank, [0] * rank, [0] * rank, [0] * rank
    for d in order:
        lane_c[d], lane = lane % tpw[d], lane // tpw[d]
        warp_c[d], warp = warp % wpc[d], warp // wpc[d]
    reps = _reps(layout, shape)
    for d in order:
        elem_c[d], reg = reg % spt[d], reg // spt[d]
    for d in order:
        rep_c[d], reg = reg % reps[d], reg // reps[d]
    return tuple((((rep_c[d] * wpc[d] + warp_c[d]) * tpw[d] + lane_c[d]) * spt[d] + elem_c[d]) % shape[d]
                 for d in range(rank))


def swizzled_offset(shared: dict, shape, coords) -> int:
    """Element offset of ``coords`` in a ``swizzled_shared`` buffer: along the fast dim (``order[0]``), groups
    of ``vec`` elements are XOR-ed with the row's phase ``(row // perPhase) % maxPhase``."""
    if len(shape) == 1:
        return coords[0]
    fast, slow = shared["order"][0], shared["order"][1]
    vec, per_phase, max_phase = int(shared["vec"]), int(shared["perPhase"]), int(shared["maxPhase"])
    row, col = coords[slow], coords[fast]
    phase = (row // per_phase) % max_phase
    return row * shape[fast] + ((col // vec) ^ phase) * vec + col % vec


def nvmma_offset(shared: dict, shape, coords, elem_bytes: int) -> int:
    """Element offset of ``coords`` in an ``nvmma_shared`` buffer (the TMA / wgmma swizzle): the fast dim (the
    last one, the first when ``transposed``) is cut into swizzle-wide column tiles stored one after another;
    in a tile, 16-byte chunks are XOR-ed with address bits 7 and up, i.e. with ``(row // perPhase) % maxPhase``
    where perPhase = 128 / swizzle bytes and maxPhase = swizzle bytes / 16. Swizzle width 0: row-major."""
    fast = 0 if shared.get("transposed") == "true" else len(shape) - 1
    slow = 1 - fast
    row, col, rows = coords[slow], coords[fast], shape[slow]
    width = int(shared["swizzlingByteWidth"])
    if width == 0:
        return row * shape[fast] + col
    tile_cols, vec = width // elem_bytes, 16 // elem_bytes
    phase = (row // (128 // width)) % (width // 16)
    tile, col = divmod(col, tile_cols)
    return tile * rows * tile_cols + row * tile_cols + ((col // vec) ^ phase) * vec + col % vec


def smem_offset(shared: dict, shape, coords, elem_bytes: int) -> int:
    """Element offset of ``coords`` in a ``swizzled_shared`` or ``nvmma_shared`` buffer."""
    if shared["kind"] == "nvmma_shared":
        return nvmma_offset(shared, shape, coords, elem_bytes)
    return swizzled_offset(shared, shape, coords)


def fast_dim(shared: dict, shape) -> int:
    """The buffer's contiguous dim."""
    if shared["kind"] == "nvmma_shared":
        return 0 if shared.get("transposed") == "true" else len(shape) - 1
    return shared["order"][0]


def _vector_elems(shared: dict, layout: dict, shape, elem_bytes: int) -> int:
    """Elements per vector load: the thread's sizePerThread run along the buffer's fast dim (<= 16 bytes),
    halved until it is contiguous and aligned in shared memory for every lane (the swizzle can split it)."""
    fast = fast_dim(shared, shape)
    if layout["order"][0] != fast:
        return 1
    vec = min(layout["sizePerThread"][fast], 16 // elem_bytes)
    nwarps = _product(layout["warpsPerCTA"])
    while vec > 1:
        if all(_contiguous(shared, layout, shape, lane, warp, reg, vec, elem_bytes)
               for warp in range(nwarps) for lane in range(WARP)
               for reg in range(0, regs_per_thread(layout, shape), vec)):
            return vec
        vec //= 2
    return 1


def _contiguous(shared, layout, shape, lane, warp, reg, vec, elem_bytes) -> bool:
    offs = [smem_offset(shared, shape, blocked_coords(layout, shape, lane, warp, reg + i), elem_bytes)
            for i in range(vec)]
    return offs[0] % vec == 0 and offs == list(range(offs[0], offs[0] + vec))


def _product(values) -> int:
    n = 1
    for v in values:
        n *= v
    return n


def conflict_degree(shared: dict, layout: dict, shape, elem_bytes: int) -> tuple:
    """(worst conflict degree over the load's warp-level instructions and hardware phases, bytes per lane
    access) of a shared -> ``blocked`` local_load. 1 = conflict-free."""
    vec = _vector_elems(shared, layout, shape, elem_bytes)
    access = vec * elem_bytes
    lanes_per_phase = LANES_PER_PHASE[access]
    worst = 0
    for warp in range(_product(layout["warpsPerCTA"])):
        for reg in range(0, regs_per_thread(layout, shape), vec):
            for first in range(0, WARP, lanes_per_phase):
                words = collections.defaultdict(set)
                for lane in range(first, first + lanes_per_phase):
                    coords = blocked_coords(layout, shape, lane, warp, reg)
                    start = smem_offset(shared, shape, coords, elem_bytes) * elem_bytes
                    for word in range(start // BANK_BYTES, (start + access - 1) // BANK_BYTES + 1):
                        words[word % BANKS].add(word)
                worst = max(worst, max(len(w) for w in words.values()))
    return worst, access


def ldmatrix_degree(shared: dict, shape, elem_bytes: int):
    """Worst conflict degree of reading the buffer with ``ldmatrix`` (the lowering of a 16-bit local_load into
    an MMA dot-operand layout; ``.trans`` when the buffer's fast dim is the operand's M / N): each 8x8 matrix
    is 8 lanes' 16-byte rows, 8 consecutive indices of the slow dim at one 16-byte chunk of the fast dim, and
    is one shared-memory pass. None when a row is not 16 contiguous bytes (then it is not an ldmatrix read)."""
    fast = fast_dim(shared, shape)
    slow = 1 - fast
    vec = 16 // elem_bytes
    worst = 0
    for chunk in range(0, shape[fast], vec):
        for first in range(0, shape[slow], 8):
            words = collections.defaultdict(set)
            for row in range(first, first + 8):
                coords = [0, 0]
                coords[slow], coords[fast] = row, chunk
                offs = [smem_offset(shared, shape, _with(coords, fast, chunk + i), elem_bytes) for i in range(vec)]
                if offs != list(range(offs[0], offs[0] + vec)) or offs[0] % vec:
                    return None
                for word in range(offs[0] * elem_bytes // BANK_BYTES, (offs[0] + vec) * elem_bytes // BANK_BYTES):
                    words[word % BANKS].add(word)
            worst = max(worst, max(len(w) for w in words.values()))
    return worst


def _with(coords, dim, value) -> list:
    out = list(coords)
    out[dim] = value
    return out


def _inline_kind(layout_ref: str, layouts: dict) -> tuple:
    """(kind, fields) of a result layout written as ``#alias`` or inline ``#ttg.kind<{...}>``."""
    if layout_ref.startswith("#ttg."):
        return layout_ref[len("#ttg."):].split("<")[0], {}
    fields = layouts.get(layout_ref[1:], {"kind": "unknown"})
    return fields["kind"], fields


def _describe(shared: dict) -> str:
    if shared["kind"] == "nvmma_shared":
        return f"nvmma {shared['swizzlingByteWidth']} B swizzle"
    return f"swizzled vec={shared['vec']} perPhase={shared['perPhase']} maxPhase={shared['maxPhase']}"


def local_loads(ttgir: str) -> list:
    """Every ``ttg.local_load`` of the main loop: dicts with ``shape``, ``dtype``, ``smem_kind``, ``reg_kind``,
    ``degree`` (int, or None when not analysed), ``access_bytes`` (swizzled loads) and ``why``."""
    layouts = parse_layouts(ttgir)
    out = []
    for dims, dtype, smem, reg_ref in _LOCAL_LOAD.findall(main_loop(ttgir)):
        shape = [int(x) for x in dims.rstrip("x").split("x")]
        shared = layouts.get(smem, {"kind": "unknown"})
        reg_kind, reg_layout = _inline_kind(reg_ref, layouts)
        load = dict(shape=shape, dtype=dtype, smem_kind=shared["kind"], reg_kind=reg_kind, degree=None,
                    access_bytes=None)
        known = shared["kind"] in ("swizzled_shared", "nvmma_shared") and len(shape) == 2 and dtype in ELEM_BYTES
        if not known:
            load["why"] = f"not analysed ({shared['kind']} {dtype}, rank {len(shape)})"
        elif reg_kind == "blocked":
            degree, access = conflict_degree(shared, reg_layout, shape, ELEM_BYTES[dtype])
            load.update(degree=degree, access_bytes=access, why=f"{_describe(shared)} -> blocked, {access} B per lane")
        elif reg_kind == "dot_op" and ELEM_BYTES[dtype] == 2 and min(shape) >= 8:
            degree = ldmatrix_degree(shared, shape, 2)
            if degree is None:
                load["why"] = f"not analysed ({_describe(shared)} -> dot_op: rows not 16 contiguous bytes)"
            else:
                load.update(degree=degree, access_bytes="ldmatrix", why=f"{_describe(shared)} -> dot_op, ldmatrix")
        else:
            load["why"] = f"not analysed ({shared['kind']} -> {reg_kind}, {dtype} {'x'.join(map(str, shape))})"
        out.append(load)
    return out


def tile_role(shape, block_m: int, block_n: int, block_k: int) -> str:
    """"W" (BLOCK_N x BLOCK_K either way round), "x" (BLOCK_M x BLOCK_K), "W|x" when both fit, "vec" for a
    per-row / per-column vector (a dim of 1: scales, beta), else "?"."""
    if min(shape) == 1:
        return "vec"
    dims = sorted(shape)
    is_w, is_x = dims == sorted((block_n, block_k)), dims == sorted((block_m, block_k))
    return "W|x" if is_w and is_x else "W" if is_w else "x" if is_x else "?"


def cell(loads: list, block_m: int, block_n: int, block_k: int, w_role: str = "W", has_w: bool = True) -> str:
    """The report's cell: ``role shape: degree (source)`` per local_load, and ``W: none (regs)`` when no load is
    the W tile. ``w_role``: what a load fitting both the W and the x shape is (the caller knows which operand
    its kernel stages); ``has_w=False`` (a GEMM without a W tile, the STE dW): shapes only, no roles."""
    parts, w_seen = [], False
    for load in loads:
        role = tile_role(load["shape"], block_m, block_n, block_k)
        role = w_role if role == "W|x" else role
        w_seen |= role == "W"
        value = load["degree"] if load["degree"] is not None else "not analysed"
        kind = {"nvmma_shared": "nvmma", "swizzled_shared": "swizzled"}.get(load["smem_kind"], load["smem_kind"])
        if load["degree"] is not None:
            access = load["access_bytes"]
            kind += ", ldmatrix" if access == "ldmatrix" else f", {access} B"
        label = f"{role} " if has_w else ""
        parts.append(f"{label}{'x'.join(map(str, load['shape']))}: {value} ({kind})")
    if has_w and not w_seen:
        parts.insert(0, "W: none (regs)")
    return "; ".join(parts) if parts else "none (no local_load)"


def w_degree(text: str):
    """The W tile's degree in a ``cell`` text: 0 when it never passes through shared memory, None when it is
    not analysed or the cell names no W tile."""
    if "W: none (regs)" in text:
        return 0
    found = re.findall(r"\bW [\dx]+: (\d+|not analysed)", text)
    if not found or "not analysed" in found:
        return None
    return max(int(v) for v in found)
