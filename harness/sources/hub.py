"""The Hugging Face Hub, reading only what one layer needs.

config.json, the tokenizer files and a sharded checkpoint's index come through hf_hub_download (so the HF
cache is used and filled); of the weights, only the safetensors header(s) and the byte ranges of the
tensors asked for are fetched with HTTP Range requests, never the multi-GB file. HF_TOKEN (or the saved
token), HF_ENDPOINT, HF_HUB_OFFLINE and the cache are honoured; the token is never printed or stored.
If the whole checkpoint is already in the cache, it is read from there and nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import time

import torch
from tqdm.auto import tqdm

from harness.errors import UserError
from harness.sources.base import Checkpoint, encode, hf_tokenizer, normalize_config

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_HEADER = 100_000_000
ATTEMPTS = 4


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's transport errors (httpx or httpx2, whichever huggingface_hub uses)."""
    from huggingface_hub.utils import get_session

    mod = importlib.import_module(type(get_session()).__module__.split(".")[0])
    return (mod.TransportError,)


def explain(
    e: Exception,
    repo: str,
    endpoint: str,
    filename: str = "a file",
    local: str = "or pass a local path with --source DIR",
) -> UserError:
    """huggingface_hub's exceptions -> one line with the fix."""
    from huggingface_hub import errors as E

    if isinstance(e, E.GatedRepoError):
        return UserError(
            f"{repo} is gated: accept its licence on the Hub (https://huggingface.co/{repo}), then set HF_TOKEN "
            f"to a token of that account, {local}"
        )
    if isinstance(e, E.RevisionNotFoundError):
        return UserError(f"{repo}: revision not found; check the @REV part of hf:{repo}@REV")
    if isinstance(e, E.RepositoryNotFoundError):
        return UserError(
            f"{repo}: repository not found or not accessible (gated or private); check the id, set HF_TOKEN, {local}"
        )
    if isinstance(e, E.EntryNotFoundError):
        return UserError(
            f"hf:{repo}: {filename} is missing on the Hub; is it an HF-format safetensors checkpoint? ({local})"
        )
    if isinstance(e, E.OfflineModeIsEnabled):
        return offline_error(repo, local)
    if isinstance(e, E.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status in (401, 403):
            return UserError(
                f"{repo}: the Hub refused access (HTTP {status}); the model may be gated: accept its licence and "
                f"set HF_TOKEN, {local}"
            )
        return UserError(f"{repo}: the Hub answered HTTP {status} from {endpoint}; try again later, {local}")
    if isinstance(e, _transport_errors()):
        return UserError(
            f"cannot reach {endpoint} ({type(e).__name__}); check the network or HF_ENDPOINT, set HF_HUB_OFFLINE=1 "
            f"to use the cache, {local}"
        )
    return UserError(f"{repo}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def offline_error(repo: str, local: str = "or pass a local path with --source DIR") -> UserError:
    return UserError(
        f"HF_HUB_OFFLINE is set and {repo} is not (completely) in the Hugging Face cache; unset HF_HUB_OFFLINE "
        f"to download it, {local}"
    )


def _cached_snapshot(repo: str, revision: str | None):
    """The cache snapshot directory if config and every weight file of the revision are cached, else None."""
    from huggingface_hub import try_to_load_from_cache

    cfg = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(cfg, str):
        return None
    snap = os.path.dirname(cfg)
    index = os.path.join(snap, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = set(json.load(f)["weight_map"].values())
    else:
        files = {"model.safetensors"}
    return snap if all(os.path.isfile(os.path.join(snap, f)) for f in files) else None


def open_hub(spec: str, *, config_path=None) -> Checkpoint:
    repo, _, revision = spec.partition("@")
    revision = revision or None
    if not repo or repo.count("/") != 1:
        raise UserError(f"hf:{spec}: expected hf:OWNER/NAME[@REV], e.g. hf:meta-llama/Llama-3.2-1B")
    snap = _cached_snapshot(repo, revision)
    if snap is not None:
        from harness.sources.local import LocalHFCheckpoint

        return LocalHFCheckpoint(snap, kind="hf-cache", provenance={"repo_id": repo, "revision": revision or "main"})
    if offline():
        raise offline_error(repo)
    return HubCheckpoint(repo, revision)


class HubCheckpoint(Checkpoint):
    def __init__(self, repo: str, revision: str | None):
        from huggingface_hub import get_hf_file_metadata, get_token, hf_hub_url

        prov = {"repo_id": repo, "revision": revision or "main", "endpoint": endpoint()}
        super().__init__(kind="hf-hub", name=repo.split("/")[-1].lower(), config={}, provenance=prov)
        self.repo, self.endpoint = repo, prov["endpoint"]
        self._token = get_token()  # HF_TOKEN or the saved token; never printed or stored
        self.files_read: set[str] = set()
        self.headers: dict[str, tuple[int, dict]] = {}
        self.bar = None
        try:
            meta = get_hf_file_metadata(
                hf_hub_url(repo, "config.json", revision=revision, endpoint=self.endpoint),
                token=self._token,
                endpoint=self.endpoint,
            )
        except Exception as e:  # noqa: BLE001 - translated into one line
            raise explain(e, repo, self.endpoint) from None
        self.sha = meta.commit_hash or revision or "main"  # pin every later read to this commit
        self.provenance["commit_sha"] = meta.commit_hash
        with open(self._download("config.json")) as f:
            raw = json.load(f)
        self.config = normalize_config(raw, f"hf:{repo}/config.json")
        self.map = self._weight_map()

    # --- whole small files, through the HF cache -------------------------------------------------------
    def _download(self, filename: str, optional: bool = False) -> str | None:
        from huggingface_hub import errors as E
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo, filename, revision=self.sha)
        try:
            path = hf_hub_download(self.repo, filename, revision=self.sha, endpoint=self.endpoint, token=self._token)
        except E.EntryNotFoundError:
            if optional:
                return None
            raise UserError(
                f"hf:{self.repo}: the repository has no {filename}; is it an HF-format checkpoint?"
            ) from None
        except Exception as e:  # noqa: BLE001
            raise explain(e, self.repo, self.endpoint) from None
        if not isinstance(cached, str):
            self.bytes_downloaded += os.path.getsize(path)
        self.files_read.add(filename)
        return path

    def _weight_map(self) -> dict[str, str]:
        """tensor -> shard file from the index; empty for a single model.safetensors (its header is the map)."""
        index = self._download("model.safetensors.index.json", optional=True)
        if index is None:
            return {}
        with open(index) as f:
            return json.load(f).get("weight_map", {})

    # --- byte ranges of the weights -------------------------------------------------------------------
    def _get(self, filename: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file on the Hub, with retries on 5xx, network errors and short bodies."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo, filename, revision=self.sha, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token) | {
            "Range": f"bytes={start}-{end - 1}",
            "Accept-Encoding": "identity",
        }
        want = end - start
        problem = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(min(0.25 * 2**attempt, 4.0))
            try:
                r = get_session().get(url, headers=headers, follow_redirects=True)
            except _transport_errors() as e:
                problem = f"{type(e).__name__}"
                continue
            if r.status_code >= 500 or r.status_code == 429:
                problem = f"HTTP {r.status_code}"
                continue
            try:
                hf_raise_for_status(r)
            except Exception as e:  # noqa: BLE001
                raise explain(e, self.repo, self.endpoint, filename) from None
            body = r.content
            if r.status_code == 200 and len(body) > want:  # a server that ignores Range: take the slice
                body = body[start:end]
            self.bytes_downloaded += len(r.content)
            if len(body) == want:
                self.files_read.add(filename)
                if self.bar is not None:
                    self.bar.update(want)
                return body
            problem = f"short body ({len(body)} of {want} bytes)"
        raise UserError(
            f"hf:{self.repo}/{filename}: download of bytes {start}-{end - 1} failed {ATTEMPTS} times ({problem}); "
            "try again later or pass a local path with --source DIR"
        )

    def _header(self, filename: str) -> tuple[int, dict]:
        if filename not in self.headers:
            (n,) = struct.unpack("<Q", self._get(filename, 0, 8))
            if not 2 <= n <= MAX_HEADER:
                raise UserError(
                    f"hf:{self.repo}/{filename}: corrupt safetensors header (length {n}); "
                    "the file on the Hub is damaged"
                )
            try:
                header = json.loads(self._get(filename, 8, 8 + n))
                assert isinstance(header, dict)
            except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
                raise UserError(
                    f"hf:{self.repo}/{filename}: corrupt safetensors header (not JSON); the file on the Hub is damaged"
                ) from None
            self.headers[filename] = (8 + n, header)
        return self.headers[filename]

    def _locate(self, name: str) -> tuple[str, int, dict]:
        if not self.map:  # single file: its header is the map
            base, header = self._header("model.safetensors")
            if name not in header and name == "lm_head.weight":
                name = "model.embed_tokens.weight"
            if name not in header:
                raise self.missing(name)
            return "model.safetensors", base, header[name]
        fn = self.map.get(name) or (self.map.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
        if fn is None:
            raise self.missing(name)
        base, header = self._header(fn)
        key = name if name in header else "model.embed_tokens.weight"
        if key not in header:
            raise UserError(
                f"hf:{self.repo}/{fn}: the index places '{name}' here but the header lacks it; "
                "the checkpoint is damaged"
            )
        return fn, base, header[key]

    def _progress(self, nbytes: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=0, unit="B", unit_scale=True, desc=f"hf:{self.repo}", disable=None, leave=False)
        self.bar.total += nbytes
        self.bar.refresh()

    def tensor(self, name: str) -> torch.Tensor:
        fn, base, info = self._locate(name)
        dtype, shape, (a, b) = DTYPES.get(info.get("dtype")), info.get("shape"), info.get("data_offsets", (0, 0))
        if dtype is None:
            raise UserError(
                f"hf:{self.repo}/{fn}: '{name}' has dtype {info.get('dtype')}, which this tool does not read"
            )
        self._progress(b - a)
        data = self._get(fn, base + a, base + b)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Only the rows asked for: row i of a [V, D] tensor is one contiguous range."""
        fn, base, info = self._locate(name)
        dtype, (V, D), (a, _) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        row = D * dtype.itemsize
        uniq = sorted(set(int(i) for i in ids.reshape(-1)))
        if uniq and not (0 <= uniq[0] and uniq[-1] < V):
            raise UserError(f"token id out of range for {name} [{V}, {D}]; the tokenizer does not match the model")
        table = {}
        runs, i = [], 0
        while i < len(uniq):  # coalesce consecutive ids into one range request
            j = i
            while j + 1 < len(uniq) and uniq[j + 1] == uniq[j] + 1:
                j += 1
            runs.append((uniq[i], uniq[j]))
            i = j + 1
        self._progress(sum((hi - lo + 1) * row for lo, hi in runs))
        for lo, hi in runs:
            data = self._get(fn, base + a + lo * row, base + a + (hi + 1) * row)
            block = torch.frombuffer(bytearray(data), dtype=dtype).reshape(hi - lo + 1, D)  # (n, D)
            for k in range(lo, hi + 1):
                table[k] = block[k - lo]
        return torch.stack([table[int(i)] for i in ids.reshape(-1)]).reshape(*ids.shape, D)  # (…, D)

    def tokenize(self, text: str):
        got = [p for p in (self._download(fn, optional=True) for fn in TOKENIZER_FILES) if p]
        if not got:
            return None
        tok = hf_tokenizer(os.path.dirname(got[0]))
        return encode(tok, text) if tok is not None else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
