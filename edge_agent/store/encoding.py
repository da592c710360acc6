"""The wire encoding of readings for the cloud, and its decoder.

Outbox rows are encoded as they are committed (writer thread), in one of two forms, by `uplink.encoding`:
- json: JSON objects, comma-joined without the enclosing brackets, so that consecutive rows concatenate into the
  telemetry message's `readings` array;
- columns: a row's readings as compact JSON columns (series names once a row), which the uplink merges, row by row,
  into one columnar, compressed message (`batch_columns`).
An outbox row written in the other form (the setting changed between runs) is converted when it is sent.

Every record is a reading `{"seq","device","point","value","unit","ts","quality","source"}`, or the aggregate of an
interval (a forwarding rule's min_interval_s), which adds `"count"` (readings it stands for), `"end"` (the interval's
end; `ts` is its start) and `"agg"` (last, avg, min, max).

## The columns message (`EAC1`), for consumers

    payload = b"EAC1" + codec + compressed(body)          codec: b"z" zstd, b"g" gzip (RFC 1952)
    body    = uint32 LE n + header (n bytes of UTF-8 JSON) + the columns, back to back

header: `gateway`, `first_seq`, `last_seq`, `count` (as the JSON message's), `series` ([device, point, unit, source]
each), `qualities` (the quality names), `strings`, `decimals` (numeric values are integers scaled by 10^decimals;
null: raw float64), `agg` ([position, count, end_ns, mode] each), `cols` ([name, dtype, bytes] each, in order). The
columns (n = count; int64 and float64 ones byte-shuffled: the 8 bytes of every value, byte 0 of all values first):
- `series` (uint8/uint16/uint32): each record's index in `series`;
- `seq` (int64): seq[0] - first_seq, then the difference from the record before;
- `ts` (int64, ns): ts[0], then the difference from the record before;
- `kind` (uint8; absent: all 0): 0 float, 1 int, 2 false, 3 true, 4 string, 5 null, 6 an int beyond 2^53 (its
  digits in `strings`);
- `num` (int64 when `decimals` is set: the scaled values of kinds 0 and 1, ordered by series (stably), each the
  difference from the previous one of its series, the first of a series as is; float64 otherwise, in record order);
- `str` (uint32; kinds 4 and 6): indexes in `strings`;
- `quality` (uint8; absent: all "good"): indexes in `qualities`.

`decode(payload)` turns either form back into the JSON message's dict (`edge-agent decode FILE` prints it).
"""
from __future__ import annotations

import gzip
import json
import math
import struct
from typing import Any, Iterator

import numpy as np

from edge_agent.records import Reading
from edge_agent.store.forward import Aggregate

_JSON_NAMES: dict[str, str] = {}
_SERIES_JSON: dict[tuple, tuple[str, str, str]] = {}  # (device, point, unit, source) -> the JSON around a value

MAGIC = b"EAC1"
CODECS = {"zstd": b"z", "gzip": b"g"}
KIND_FLOAT, KIND_INT, KIND_FALSE, KIND_TRUE, KIND_STR, KIND_NULL, KIND_BIGINT = range(7)
MAX_EXACT = 2 ** 53
MAX_BODY = 256 << 20  # a decoded message larger than this is refused (a compression bomb)


class DecodeError(ValueError):
    """A payload that is not a telemetry message of either form."""


def _json_name(s: str | None) -> str:
    v = _JSON_NAMES.get(s)  # type: ignore[arg-type]
    if v is None:
        if len(_JSON_NAMES) > 100_000:  # bounded: names are few, but never trust that
            _JSON_NAMES.clear()
        v = _JSON_NAMES[s] = json.dumps(s, ensure_ascii=False)  # type: ignore[index]
    return v


def _json_value(v: Any) -> tuple[str, bool]:
    """(JSON text, ok); non-finite floats (adapters reject them; this is the last guard) become null."""
    t = type(v)
    if t is float:
        return (repr(v), True) if math.isfinite(v) else ("null", False)
    if t is bool:
        return ("true" if v else "false"), True
    if t is int:
        return str(v), True
    return json.dumps(v, ensure_ascii=False), True


def encode_json(seqs: list[int], records: list) -> bytes:
    """JSON objects of `records` with their `seqs`, comma-joined without the enclosing brackets, so that consecutive
    chunks concatenate into one array. Same output as json.dumps of {"seq", "device", "point", "value", "unit",
    "ts", "quality", "source"} (and "count", "end", "agg" for an aggregate), three times faster."""
    parts = []
    pieces = _SERIES_JSON
    for seq, r in zip(seqs, records):
        key = (r.device, r.point, r.unit, r.source)
        p = pieces.get(key)
        if p is None:
            if len(pieces) > 100_000:  # bounded, like _JSON_NAMES
                pieces.clear()
            p = pieces[key] = (f',"device":{_json_name(r.device)},"point":{_json_name(r.point)},"value":',
                               f',"unit":{_json_name(r.unit)},"ts":', f',"source":{_json_name(r.source)}')
        v = r.value
        if type(v) is float and math.isfinite(v):
            value, ok = repr(v), True
        else:
            value, ok = _json_value(v)
        tail = "}" if len(r) == 7 else f',"count":{r.count},"end":{r.end_ns},"agg":"{r.mode}"}}'
        parts.append(f'{{"seq":{seq}{p[0]}{value}{p[1]}{r.ts_ns},"quality":'
                     f'{_json_name(r.quality if ok else "bad")}{p[2]}{tail}')
    return ",".join(parts).encode()


def encode_rows(seqs: list[int], records: list) -> bytes:
    """A row's records as compact JSON columns (the columns encoding's outbox form), which the uplink merges without a
    loop per record: {"k": ["device\\0point\\0unit\\0source", ...], "i": key index, "s": seqs, "t": ts, "c": the kinds
    (one digit a record, as the message's `kind` column), "v": the numbers (kinds 0 and 1), "o": the texts (kinds 4
    and 6), "q": [[position, quality], ...] where not good, "a": [[position, count, end, mode], ...] for aggregates}.
    A unit of None is written as "\\1"."""
    keys: dict[tuple, int] = {}
    idx, ts, kinds, nums, texts, bad, aggs = [], [], [], [], [], [], []
    for pos, r in enumerate(records):
        key = (r.device, r.point, r.unit, r.source)
        k = keys.get(key)
        if k is None:
            k = keys[key] = len(keys)
        idx.append(k)
        ts.append(r.ts_ns)
        v = r.value
        t = type(v)
        if t is float:
            if math.isfinite(v):
                kinds.append("0")
                nums.append(v)
            else:  # adapters reject them; this is the last guard
                kinds.append("5")
                bad.append([pos, "bad"])
        elif t is int:
            if -MAX_EXACT < v < MAX_EXACT:
                kinds.append("1")
                nums.append(v)
            else:
                kinds.append("6")
                texts.append(str(v))
        elif t is bool:
            kinds.append("3" if v else "2")
        else:
            kinds.append("4")
            texts.append(str(v))
        if r.quality != "good" and not (bad and bad[-1][0] == pos):
            bad.append([pos, r.quality])
        if len(r) > 7:
            aggs.append([pos, r.count, r.end_ns, r.mode])
    doc = {"k": ["\0".join((d, p, "\1" if u is None else u, src)) for d, p, u, src in keys], "i": idx, "s": list(seqs),
           "t": ts, "c": "".join(kinds), "v": nums, "o": texts}
    if bad:
        doc["q"] = bad
    if aggs:
        doc["a"] = aggs
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _key(k: str) -> list:
    device, point, unit, source = k.split("\0")
    return [device, point, None if unit == "\1" else unit, source]


def _value(kind: int, nums: Iterator, texts: Iterator) -> Any:
    if kind == KIND_FLOAT:
        return float(next(nums))
    if kind == KIND_INT:
        return int(next(nums))
    if kind in (KIND_FALSE, KIND_TRUE):
        return kind == KIND_TRUE
    if kind == KIND_NULL:
        return None
    if kind == KIND_STR:
        return next(texts)
    if kind == KIND_BIGINT:
        return int(next(texts))
    raise DecodeError(f"unknown kind {kind}")


def _records(payload: bytes) -> list[dict]:
    """An outbox row's records as dicts, whichever form it is in."""
    if not payload:
        return []
    if payload.startswith(b'{"k"'):
        doc = json.loads(payload)
        out = []
        q = dict((p, v) for p, v in doc.get("q", ()))
        a = {x[0]: x[1:] for x in doc.get("a", ())}
        keys = [_key(k) for k in doc["k"]]
        nums, texts = iter(doc["v"]), iter(doc["o"])
        for pos, (k, seq, ts, c) in enumerate(zip(doc["i"], doc["s"], doc["t"], doc["c"])):
            device, point, unit, source = keys[k]
            rec = {"seq": seq, "device": device, "point": point, "value": _value(int(c), nums, texts), "unit": unit,
                   "ts": ts, "quality": q.get(pos, "good"), "source": source}
            if pos in a:
                rec["count"], rec["end"], rec["agg"] = a[pos]
            out.append(rec)
        return out
    return json.loads(b"[" + payload + b"]")


def _record(r: dict) -> Reading | Aggregate:
    """A record decoded from a JSON row, as encode_rows reads it (null, a non-finite float's JSON, as NaN again)."""
    v = math.nan if r["value"] is None else r["value"]
    base = (r["device"], r["point"], v, r["unit"], r["ts"], r["quality"], r["source"])
    return Aggregate(*base, r["count"], r["end"], r["agg"]) if "count" in r else Reading(*base)


def batch_json(gateway: str, first: int, last: int, count: int, payloads: list[bytes]) -> bytes:
    """The JSON telemetry message of outbox rows (their payloads in order)."""
    parts = []
    for p in payloads:
        if not p:
            continue
        if p.startswith(b'{"k"'):  # written under the columns encoding
            p = json.dumps(_records(p), separators=(",", ":"), ensure_ascii=False)[1:-1].encode()
        parts.append(p)
    return (f'{{"gateway":"{gateway}","first_seq":{first},"last_seq":{last},"count":{count},"readings":['
            ).encode() + b",".join(parts) + b"]}"


def _shuffle(a: np.ndarray) -> bytes:
    return a.view(np.uint8).reshape(-1, 8).T.tobytes()


def _unshuffle(b: bytes, dtype: str, n: int) -> np.ndarray:
    if len(b) != 8 * n:
        raise DecodeError(f"a column holds {len(b)} bytes, {8 * n} expected")
    return np.frombuffer(b, np.uint8).reshape(8, n).T.copy().view(dtype).ravel()


def _decimals(vals: np.ndarray) -> int | None:
    """The fewest decimals d with every value exactly an integer / 10^d (below 2^53), or None."""
    if not len(vals):
        return 0
    if np.any((vals == 0) & np.signbit(vals)):
        return None  # -0.0 would come back as 0.0
    if np.abs(vals).max() >= MAX_EXACT:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        for d in range(10):
            scale = 10.0 ** d
            sc = np.rint(vals * scale)
            if np.all(np.abs(sc) < MAX_EXACT) and np.array_equal(sc / scale, vals):
                return d
    return None


def batch_columns(gateway: str, first: int, last: int, count: int, payloads: list[bytes], compression: str,
                  level: int = 3) -> bytes:
    """The columns telemetry message (see the module's doc) of outbox rows (their payloads in order)."""
    series: dict[str, int] = {}
    sidx: list[np.ndarray] = []
    kinds_parts: list[str] = []
    seqs, ts, nums, texts, quals, aggs = [], [], [], [], [], []
    n = 0
    for p in payloads:
        if not p:
            continue
        if not p.startswith(b'{"k"'):  # written under the json encoding
            recs = _records(p)
            p = encode_rows([r["seq"] for r in recs], [_record(r) for r in recs])
        doc = json.loads(p)
        remap = np.array([series.setdefault(k, len(series)) for k in doc["k"]], dtype=np.int64)
        sidx.append(remap[np.asarray(doc["i"], dtype=np.int64)] if doc["i"] else np.zeros(0, np.int64))
        seqs.extend(doc["s"])
        ts.extend(doc["t"])
        kinds_parts.append(doc["c"])
        nums.extend(doc["v"])
        texts.extend(doc["o"])
        quals.extend((n + pos, q) for pos, q in doc.get("q", ()))
        aggs.extend([n + a[0], *a[1:]] for a in doc.get("a", ()))
        n += len(doc["i"])
    s_arr = np.concatenate(sidx) if sidx else np.zeros(0, np.int64)
    seq_arr = np.asarray(seqs, dtype=np.int64)
    ts_arr = np.asarray(ts, dtype=np.int64)
    kinds = np.frombuffer("".join(kinds_parts).encode("ascii"), np.uint8) - ord("0")
    num_arr = np.asarray(nums, dtype=np.float64)
    decimals = _decimals(num_arr)
    if decimals is None:
        num_col = np.ascontiguousarray(num_arr, dtype="<f8")
        num_dtype = "<f8"
    else:
        sc = np.rint(num_arr * 10.0 ** decimals).astype(np.int64)
        g = s_arr[(kinds == KIND_FLOAT) | (kinds == KIND_INT)]
        order = np.argsort(g, kind="stable")
        ss, gs = sc[order], g[order]
        num_col = np.empty_like(ss)
        if len(ss):
            num_col[0] = ss[0]
            num_col[1:] = ss[1:] - ss[:-1]
            starts = np.r_[True, gs[1:] != gs[:-1]]
            num_col[starts] = ss[starts]
        num_col = num_col.astype("<i8")
        num_dtype = "<i8"
    width = "<u1" if len(series) <= 256 else "<u2" if len(series) <= 65536 else "<u4"
    d_seq = np.empty_like(seq_arr)
    d_ts = np.empty_like(ts_arr)
    if n:
        d_seq[0], d_ts[0] = seq_arr[0] - first, ts_arr[0]
        d_seq[1:], d_ts[1:] = seq_arr[1:] - seq_arr[:-1], ts_arr[1:] - ts_arr[:-1]
    cols: list[tuple[str, str, bytes]] = [
        ("series", width, s_arr.astype(width).tobytes()),
        ("seq", "<i8", _shuffle(d_seq.astype("<i8"))),
        ("ts", "<i8", _shuffle(d_ts.astype("<i8"))),
    ]
    if kinds.any():
        cols.append(("kind", "<u1", kinds.tobytes()))
    cols.append(("num", num_dtype, _shuffle(num_col)))
    strings: dict[str, int] = {}
    if texts:
        cols.append(("str", "<u4", np.asarray([strings.setdefault(t, len(strings)) for t in texts],
                                              dtype="<u4").tobytes()))
    qualities: dict[str, int] = {"good": 0}
    if quals:
        qcol = np.zeros(n, np.uint8)
        for pos, q in quals:
            if len(qualities) < 255 or q in qualities:
                qcol[pos] = qualities.setdefault(q, len(qualities))
            else:
                qcol[pos] = qualities.setdefault("other", len(qualities))
        cols.append(("quality", "<u1", qcol.tobytes()))
    header = {"gateway": gateway, "first_seq": first, "last_seq": last, "count": count,
              "series": [_key(k) for k in series], "qualities": list(qualities), "strings": list(strings),
              "decimals": decimals, "agg": aggs, "cols": [[name, dt, len(b)] for name, dt, b in cols]}
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body = b"".join([struct.pack("<I", len(head)), head, *(b for _, _, b in cols)])
    return MAGIC + CODECS[compression] + compress(body, compression, level)


def compress(body: bytes, compression: str, level: int = 3) -> bytes:
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=level).compress(body)
    return gzip.compress(body, compresslevel=6, mtime=0)


def _decompress(data: bytes, codec: bytes) -> bytes:
    if codec == b"z":
        try:
            import zstandard
        except ImportError:
            raise DecodeError("a zstd message needs the zstandard package (pip install zstandard)") from None
        import io
        parts, size = [], 0
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                while size <= MAX_BODY:  # read in steps: a small message may not expand beyond the bound
                    part = reader.read(1 << 20)
                    if not part:
                        break
                    parts.append(part)
                    size += len(part)
        except zstandard.ZstdError as e:
            raise DecodeError(f"zstd: {e}") from None
        if size > MAX_BODY:
            raise DecodeError(f"decoded body above {MAX_BODY} bytes")
        return b"".join(parts)
    if codec == b"g":
        import zlib
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(data, MAX_BODY + 1)
        except zlib.error as e:
            raise DecodeError(f"gzip: {e}") from None
        if len(out) > MAX_BODY:
            raise DecodeError(f"decoded body above {MAX_BODY} bytes")
        return out
    raise DecodeError(f"unknown codec {codec!r}")


def decode(payload: bytes) -> dict:
    """A telemetry message of either form -> {"gateway", "first_seq", "last_seq", "count", "readings": [...]}, the
    JSON message's shape. Raises DecodeError."""
    if payload[:4] != MAGIC:
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise DecodeError(f"neither a columns message (EAC1) nor JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("readings"), list):
            raise DecodeError("a JSON message without readings")
        return doc
    body = _decompress(payload[5:], payload[4:5])
    try:
        (hlen,) = struct.unpack_from("<I", body)
        h = json.loads(body[4:4 + hlen])
        n = int(h["count"])
        off = 4 + hlen
        cols: dict[str, tuple[str, bytes]] = {}
        for name, dt, size in h["cols"]:
            cols[name] = (dt, body[off:off + size])
            off += size
        if off != len(body):
            raise DecodeError(f"the columns hold {off} bytes of a {len(body)}-byte body")

        def col(name: str, dtype: str) -> np.ndarray:
            dt, b = cols[name]
            if dt != dtype:
                raise DecodeError(f"column {name}: dtype {dt}, {dtype} expected")
            if dtype in ("<i8", "<f8"):
                return _unshuffle(b, dtype, len(b) // 8)
            return np.frombuffer(b, dtype)

        s_arr = np.frombuffer(cols["series"][1], cols["series"][0]).astype(np.int64)
        seq = np.cumsum(col("seq", "<i8")) + int(h["first_seq"])
        ts = np.cumsum(col("ts", "<i8"))
        kinds = col("kind", "<u1") if "kind" in cols else np.zeros(n, np.uint8)
        qual = col("quality", "<u1") if "quality" in cols else np.zeros(n, np.uint8)
        if not (len(s_arr) == len(seq) == len(ts) == len(kinds) == len(qual) == n):
            raise DecodeError("columns of different lengths")
        numeric = (kinds == KIND_FLOAT) | (kinds == KIND_INT)
        num_pos = np.nonzero(numeric)[0]
        d = h["decimals"]
        if d is None:
            num = col("num", "<f8")
            scaled = None
        else:
            delta = col("num", "<i8")
            g = s_arr[num_pos]
            order = np.argsort(g, kind="stable")
            gs = g[order]
            scaled_sorted = np.zeros(len(delta), np.int64)
            if len(delta):
                starts = np.r_[True, gs[1:] != gs[:-1]]
                cs = np.cumsum(delta)
                group = np.cumsum(starts) - 1
                base = (cs - delta)[starts]
                scaled_sorted = cs - base[group]
            scaled = np.empty_like(scaled_sorted)
            scaled[order] = scaled_sorted
            num = scaled / 10.0 ** d
        if len(num) != len(num_pos):
            raise DecodeError("the num column does not match the numeric records")
        strs = col("str", "<u4") if "str" in cols else np.zeros(0, np.uint32)
        series, strings, qualities = h["series"], h["strings"], h["qualities"]
        aggs = {a[0]: a[1:] for a in h["agg"]}
        if scaled is not None:
            ints = iter(int(x) // 10 ** d for x in scaled[kinds[num_pos] == KIND_INT])
        else:
            ints = iter(int(x) for x in num[kinds[num_pos] == KIND_INT])
        floats = iter(num[kinds[num_pos] == KIND_FLOAT].tolist())
        texts = iter(strings[int(i)] for i in strs)
        out = []
        for pos in range(n):
            k = int(kinds[pos])
            v = _value(k, ints if k == KIND_INT else floats, texts)
            device, point, unit, source = series[int(s_arr[pos])]
            rec = {"seq": int(seq[pos]), "device": device, "point": point, "value": v, "unit": unit,
                   "ts": int(ts[pos]), "quality": qualities[int(qual[pos])], "source": source}
            if pos in aggs:
                rec["count"], rec["end"], rec["agg"] = aggs[pos]
            out.append(rec)
    except DecodeError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, StopIteration, struct.error) as e:
        raise DecodeError(f"a malformed columns message: {type(e).__name__}: {e}") from None
    return {"gateway": h["gateway"], "first_seq": h["first_seq"], "last_seq": h["last_seq"], "count": n,
            "readings": out}

