# runner's Python worker: hosts one Cog predictor (BasePredictor/BaseRunner or a function)
# in the user's Python, with the `cog` package importable, and talks to runner over a
# private channel: JSON lines on the stdout it had at start (file descriptor 3 after the
# swap below); requests arrive as JSON lines on stdin. Anything the predictor prints (Python
# or C level) goes to stderr or into the prediction's logs, never into the channel.
#
#   python worker.py describe MODEL_DIR MODULE_FILE CLASS  -> {"event": "describe", ...}
#   python worker.py serve MODEL_DIR MODULE_FILE CLASS     -> describe; on `setup`: setup,
#                                                              then predictions
#
# Messages to runner: describe, setup_log, ready, setup_failed, log, output, metric,
# healthcheck, done.
# Messages from runner: setup, predict {id, input, context}, cancel {id}, healthcheck {id},
# shutdown.
import ast
import asyncio
import concurrent.futures
import contextvars
import ctypes
import importlib
import inspect
import io
import json
import os
import sys
import threading
import traceback
import typing

# The channel: the original stdout, kept private; fd 1 now points at stderr so that C
# extensions and subprocesses printing to stdout cannot corrupt it.
_channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
_channel_lock = threading.Lock()


def send(message):
    line = json.dumps(message, default=_json_default, allow_nan=False)
    with _channel_lock:
        _channel.write(line + "\n")
        _channel.flush()


def _json_default(value):
    import pathlib

    if isinstance(value, pathlib.PurePath):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if hasattr(value, "dict") and callable(value.dict):
        return value.dict()
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    raise TypeError(f"output of type {type(value).__name__} is not JSON-serializable")


# --- per-prediction output capture -------------------------------------------------------

_current_prediction = contextvars.ContextVar("runner_prediction", default=None)


class _Capture(io.TextIOBase):
    """sys.stdout/sys.stderr: lines go to the running prediction's logs (setup logs outside
    a prediction), whichever thread or task prints them."""

    def __init__(self, fallback):
        self._fallback = fallback
        self._partial = {}

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            text = str(text)
        pid = _current_prediction.get()
        key = pid or ""
        buf = self._partial.get(key, "") + text
        *lines, rest = buf.split("\n")
        self._partial[key] = rest
        for line in lines:
            self._emit(pid, line + "\n")
        return len(text)

    def flush(self):
        for key, rest in list(self._partial.items()):
            if rest:
                self._emit(key or None, rest)
                self._partial[key] = ""

    def _emit(self, pid, data):
        if pid is not None:
            send({"event": "log", "id": pid, "data": data})
        else:
            send({"event": "setup_log", "data": data})

    def fileno(self):
        return self._fallback.fileno()

    @property
    def encoding(self):
        return "utf-8"


# --- metrics (cog.current_scope()) -------------------------------------------------------


_METRIC_MODES = ("replace", "incr", "append")

# Each prediction's `context` from its request (Cog: a dict of strings), by prediction id.
_contexts = {}


def _record(key, value, mode):
    mode = "replace" if mode is None else str(mode).lower()
    if mode not in _METRIC_MODES:
        raise TypeError(f"Invalid metric mode: '{mode}'. Expected 'replace', 'incr', or 'append'.")
    if mode == "incr" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"Increment mode requires int or float, got {type(value).__name__}")
    pid = _current_prediction.get()
    if pid is not None:
        send({"event": "metric", "id": pid, "name": key, "value": value, "mode": mode})


class _Metrics:
    """`scope.metrics`, as Cog's: `record(key, value, mode)`, `metrics[key] = value`
    (replace), `del metrics[key]`."""

    def record(self, key, value, mode=None):
        _record(key, value, mode)

    def __setitem__(self, key, value):
        _record(key, value, "replace")

    def __delitem__(self, key):
        _record(key, None, "replace")


class _Scope:
    """`cog.current_scope()`: the running prediction's metrics and request context."""

    metrics = _Metrics()

    def record_metric(self, key, value, mode=None):
        _record(key, value, mode)

    @property
    def context(self):
        return dict(_contexts.get(_current_prediction.get(), {}))

    def __getattr__(self, name):
        raise AttributeError(f"runner's scope has no `{name}`")


def _install_scope():
    try:
        import coglet  # noqa: F401

        sdk = getattr(coglet, "_sdk", None)
        if sdk is not None:
            sdk.current_scope = lambda: _Scope()
    except Exception:  # noqa: BLE001 - older cog packages have no scope
        pass


# --- the predictor's signature, in runner's terms ----------------------------------------


def _function_def(fn):
    """The predict function's definition as parsed from its source (Cog's schema generator
    reads the source), or None when the source is not available."""
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    return next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)


def _explicit_defaults(fdef):
    """Which parameters declare a default in the source (`x=None`, `Input(default=None)`):
    `default=None` differs from no default."""
    if fdef is None:
        return {}
    args = fdef.args.args + fdef.args.kwonlyargs
    defaults = [None] * (len(fdef.args.args) - len(fdef.args.defaults)) + list(fdef.args.defaults) + list(fdef.args.kw_defaults)
    out = {}
    for arg, node in zip(args, defaults):
        if node is None:
            continue
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "Input":
            out[arg.arg] = any(k.arg == "default" for k in node.keywords) or bool(node.args)
        else:
            out[arg.arg] = True
    return out


def _declared_streaming(fdef):
    """`@cog.streaming` leaves no trace at run time, only in the source."""
    if fdef is None:
        return False
    for d in fdef.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if getattr(target, "id", None) == "streaming" or getattr(target, "attr", None) == "streaming":
            return True
    return False


def _field_type(ft):
    from cog import _adt as adt

    if ft.union_variants:
        return {"union": [_field_type(v) for v in ft.union_variants]}
    prim = _prim_name(ft.primitive)
    if ft.repetition in (adt.Repetition.REPEATED, adt.Repetition.OPTIONAL_REPEATED):
        return {"list": prim}
    return {"prim": prim}


def _prim_name(p):
    return {
        "BOOL": "bool",
        "FLOAT": "float",
        "INTEGER": "int",
        "STRING": "str",
        "PATH": "path",
        "FILE": "file",
        "SECRET": "secret",
        "ANY": "any",
        "CUSTOM": "any",
    }[p.name]


def _output_type(ot):
    from cog import _adt as adt

    kind = ot.kind
    if kind is adt.OutputKind.OBJECT:
        fields = []
        for name, ft in (ot.fields or {}).items():
            inner = {"prim": _prim_name(ft.primitive)}
            if ft.repetition in (adt.Repetition.REPEATED, adt.Repetition.OPTIONAL_REPEATED):
                inner = {"list": inner}
            required = ft.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED)
            fields.append([name, inner, required])
        return {"object": fields}
    inner = {"prim": _prim_name(ot.type)}
    if kind is adt.OutputKind.SINGLE:
        return inner
    if kind is adt.OutputKind.LIST:
        return {"list": inner}
    if kind is adt.OutputKind.ITERATOR:
        return {"iterator": inner}
    return {"concatenate_iterator": inner}


def _load(model_dir, module_file, class_name):
    sys.path.insert(0, model_dir)
    os.chdir(model_dir)
    module_name = os.path.splitext(module_file)[0].replace("/", ".")
    from cog import _inspector

    info = _inspector.create_predictor(module_name, class_name)
    module = importlib.import_module(module_name)
    target = getattr(module, class_name)
    return info, target


def _predict_function(target):
    if inspect.isclass(target):
        for name in ("run", "predict"):
            fn = getattr(target, name, None)
            if fn is not None and getattr(fn, "__qualname__", "").split(".")[0] not in ("BasePredictor", "BaseRunner"):
                return name, fn
        return "predict", getattr(target, "predict")
    return target.__name__, target


def describe(model_dir, module_file, class_name):
    info, target = _load(model_dir, module_file, class_name)
    send(_description(info, target))


def _description(info, target):
    """The predictor's signature, in runner's terms (the `describe` event)."""
    _, fn = _predict_function(target)
    unwrapped = inspect.unwrap(fn)
    fdef = _function_def(unwrapped)
    explicit = _explicit_defaults(fdef)
    from cog import _adt as adt

    inputs = []
    for field in sorted(info.inputs.values(), key=lambda f: f.order):
        ft = field.type
        entry = {
            "name": field.name,
            "type": _field_type(ft),
            "optional": ft.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED),
            "description": field.description,
            "ge": field.ge,
            "le": field.le,
            "min_length": field.min_length,
            "max_length": field.max_length,
            "regex": field.regex,
            "choices": field.choices or [],
            "deprecated": bool(field.deprecated),
        }
        if field.default is not None or explicit.get(field.name):
            entry["default"] = _encode_default(field.default)
        inputs.append(entry)
    streaming = _declared_streaming(fdef)
    concurrent = getattr(fn, "__cog_concurrent_max__", None) or getattr(unwrapped, "__cog_concurrent_max__", None)
    return {
        "event": "describe",
        "signature": {"inputs": inputs, "output": _output_type(info.output), "streaming": streaming},
        "is_async": inspect.iscoroutinefunction(unwrapped) or inspect.isasyncgenfunction(unwrapped),
        "concurrent_max": concurrent,
        # Whether GET /health-check has a check of the predictor's own to run.
        "has_healthcheck": inspect.isclass(target) and callable(getattr(target, "healthcheck", None)),
    }


def _encode_default(value):
    if isinstance(value, (list, tuple)):
        return [_encode_default(v) for v in value]
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --- serving -----------------------------------------------------------------------------


class _Predictions:
    def __init__(self):
        self.lock = threading.Lock()
        self.threads = {}  # id -> thread ident (sync predictions)
        self.tasks = {}  # id -> asyncio task (async predictions)
        self.canceled = set()


def serve(model_dir, module_file, class_name):
    sys.stdout = _Capture(sys.__stdout__)
    sys.stderr = _Capture(sys.__stderr__)
    _install_scope()
    try:
        info, target = _load(model_dir, module_file, class_name)
        description = _description(info, target)
    except BaseException:  # noqa: BLE001 - an import that fails is reported
        sys.stdout.flush()
        sys.stderr.flush()
        send({"event": "setup_failed", "error": traceback.format_exc()})
        return
    # One import serves both: runner reads the signature, then says when to set up (or
    # stops the worker, when it only wanted the signature).
    send(description)
    for line in sys.stdin:
        op = json.loads(line).get("op") if line.strip() else None
        if op == "setup":
            break
        if op == "shutdown":
            os._exit(0)
    else:
        os._exit(0)
    try:
        instance = target() if inspect.isclass(target) else None
        _, fn = _predict_function(target)
        predict = getattr(instance, fn.__name__) if instance is not None else fn
        setup = getattr(instance, "setup", None) if instance is not None else None
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="runner-asyncio", daemon=True).start()
        if setup is not None:
            kwargs = {}
            params = inspect.signature(setup).parameters
            if "weights" in params:
                # Cog hands setup() the COG_WEIGHTS location: a URL as is, a local path as
                # a cog.Path; None when there are none.
                from cog.types import Path as CogPath

                weights = os.environ.get("COG_WEIGHTS")
                if weights and "://" not in weights:
                    weights = CogPath(weights)
                kwargs["weights"] = weights or None
            result = setup(**kwargs)
            if inspect.isawaitable(result):
                asyncio.run_coroutine_threadsafe(result, loop).result()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - every setup failure is reported
        sys.stdout.flush()
        sys.stderr.flush()
        send({"event": "setup_failed", "error": traceback.format_exc()})
        return
    send({"event": "ready"})
    state = _Predictions()
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        op = request.get("op")
        if op == "predict":
            _contexts[request["id"]] = request.get("context") or {}
            _start(request["id"], request.get("input") or {}, info, predict, loop, state)
        elif op == "cancel":
            _cancel(request["id"], loop, state)
        elif op == "healthcheck":
            _healthcheck(request["id"], getattr(instance, "healthcheck", None), loop)
        elif op == "shutdown":
            break
    os._exit(0)


# Cog's limit on a user-defined healthcheck().
_HEALTHCHECK_SECONDS = 5.0  # HEALTHCHECK_TIMEOUT in mod.rs


def _healthcheck(hid, check, loop):
    """Runs the predictor's own `healthcheck()` (sync or async) off the request loop, as
    Cog does on GET /health-check, and reports healthy or why not, in Cog's words."""

    def run():
        error = None
        try:
            if check is None:
                healthy = True
            elif inspect.iscoroutinefunction(inspect.unwrap(check)):
                healthy = asyncio.run_coroutine_threadsafe(check(), loop).result(_HEALTHCHECK_SECONDS)
            else:
                result = {}

                def call():
                    try:
                        result["value"] = check()
                    except BaseException as e:  # noqa: BLE001
                        result["error"] = e

                t = threading.Thread(target=call, name="healthcheck", daemon=True)
                t.start()
                t.join(_HEALTHCHECK_SECONDS)
                if t.is_alive():
                    raise TimeoutError()
                if "error" in result:
                    raise result["error"]
                healthy = result["value"]
            if healthy is False:
                error = "Healthcheck failed: user-defined healthcheck returned False"
        except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError):
            error = f"Healthcheck failed: user-defined healthcheck timed out after {_HEALTHCHECK_SECONDS} seconds"
        except BaseException as e:  # noqa: BLE001
            error = f"Healthcheck failed: {type(e).__name__}: {e}"
        send({"event": "healthcheck", "id": hid, "error": error})

    threading.Thread(target=run, name=f"healthcheck-{hid}", daemon=True).start()


def _inputs(values, info):
    """Turns runner's validated JSON input into the Python values Cog would pass."""
    from cog import _adt as adt
    from cog.types import Path, Secret

    out = {}
    for name, field in info.inputs.items():
        if name not in values:
            continue
        value = values[name]
        prim = field.type.primitive
        def one(v):
            if v is None:
                return None
            if prim in (adt.PrimitiveType.PATH, adt.PrimitiveType.FILE):
                return Path(v) if prim is adt.PrimitiveType.PATH else open(v, "rb")
            if prim is adt.PrimitiveType.SECRET:
                return Secret(secret_value=v)
            return v
        out[name] = [one(v) for v in value] if isinstance(value, list) and field.type.repetition.name.endswith("REPEATED") else one(value)
    return out


def _finish(pid, state, message):
    _contexts.pop(pid, None)
    with state.lock:
        state.threads.pop(pid, None)
        state.tasks.pop(pid, None)
        canceled = pid in state.canceled
        state.canceled.discard(pid)
    sys.stdout.flush()
    sys.stderr.flush()
    if canceled and message["status"] != "succeeded":
        message = {"event": "done", "id": pid, "status": "canceled"}
    send(message)


def _encode(value):
    import pathlib

    if isinstance(value, pathlib.PurePath):
        return os.path.abspath(str(value))
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if hasattr(value, "model_dump") or (hasattr(value, "__dict__") and not isinstance(value, (str, int, float, bool))):
        return _encode(_json_default(value))
    return value


def _start(pid, values, info, predict, loop, state):
    try:
        kwargs = _inputs(values, info)
    except Exception:  # noqa: BLE001
        _contexts.pop(pid, None)
        send({"event": "done", "id": pid, "status": "failed", "error": traceback.format_exc(limit=1)})
        return
    fn = inspect.unwrap(predict)
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        ctx = contextvars.copy_context()
        ctx.run(_current_prediction.set, pid)

        async def run_async():
            try:
                result = predict(**kwargs)
                if inspect.isasyncgen(result):
                    async for chunk in result:
                        send({"event": "output", "id": pid, "chunk": _encode(chunk)})
                    output = None
                else:
                    output = _encode(await result)
                _finish(pid, state, {"event": "done", "id": pid, "status": "succeeded", "output": output})
            except asyncio.CancelledError:
                _finish(pid, state, {"event": "done", "id": pid, "status": "canceled"})
            except BaseException as e:  # noqa: BLE001
                _finish(pid, state, {"event": "done", "id": pid, "status": "failed", "error": str(e) or type(e).__name__})

        def schedule():
            task = ctx.run(loop.create_task, run_async())
            with state.lock:
                state.tasks[pid] = task
                early = pid in state.canceled
            if early:  # canceled before it was scheduled
                task.cancel()

        loop.call_soon_threadsafe(schedule)
        return

    def run_sync():
        _current_prediction.set(pid)
        with state.lock:
            state.threads[pid] = threading.get_ident()
            early = pid in state.canceled
        try:
            if early:  # canceled before its thread started
                from cog import CancelationException

                raise CancelationException()
            result = predict(**kwargs)
            if inspect.isgenerator(result):
                for chunk in result:
                    send({"event": "output", "id": pid, "chunk": _encode(chunk)})
                output = None
            else:
                output = _encode(result)
            _finish(pid, state, {"event": "done", "id": pid, "status": "succeeded", "output": output})
        except BaseException as e:  # noqa: BLE001 - CancelationException included
            if type(e).__name__ == "CancelationException":
                _finish(pid, state, {"event": "done", "id": pid, "status": "canceled"})
            else:
                _finish(pid, state, {"event": "done", "id": pid, "status": "failed", "error": str(e) or type(e).__name__})

    threading.Thread(target=contextvars.copy_context().run, args=(run_sync,), name=f"predict-{pid}", daemon=True).start()


def _cancel(pid, loop, state):
    with state.lock:
        state.canceled.add(pid)
        ident = state.threads.get(pid)
        task = state.tasks.get(pid)
    if task is not None:
        loop.call_soon_threadsafe(task.cancel)
    elif ident is not None:
        # Cog's behaviour: the sync predictor gets CancelationException where it runs.
        from cog import CancelationException

        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(CancelationException))


def main():
    mode, model_dir, module_file, class_name = sys.argv[1:5]
    try:
        import cog  # noqa: F401
    except ImportError as e:
        send({"event": "error", "message": f"the `cog` package is not importable by {sys.executable} ({e}): install it with `{sys.executable} -m pip install cog==0.23.1`"})
        return 3
    try:
        if mode == "describe":
            describe(model_dir, module_file, class_name)
        else:
            serve(model_dir, module_file, class_name)
    except BaseException:  # noqa: BLE001
        send({"event": "error", "message": traceback.format_exc()})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
