# The Python twin of runner's `candle:conformance` test architecture, for running the
# conformance cases (cog-spec/conformance/) against Cog's own server (coglet).
# Same inputs, constraints, logs, outputs and errors as crates/runner-models/src/conformance.rs.
import os
import time
from typing import List, Optional

from cog import BaseModel, BasePredictor, Input, Secret


class Output(BaseModel):
    text: str
    count: int
    ratio: float
    flag: bool
    color: str
    size: int
    code: str
    api_key_length: int
    note_given: bool
    tags: List[str]


class Predictor(BasePredictor):
    def setup(self) -> None:
        delay = float(os.environ.get("CONFORMANCE_SETUP_DELAY", "0"))
        if delay > 0:
            print(f"conformance: setup takes {delay:g} s")
            time.sleep(delay)
        if os.environ.get("CONFORMANCE_SETUP_FAIL"):
            print("conformance: failing setup as asked")
            raise RuntimeError("setup failed on purpose: CONFORMANCE_SETUP_FAIL is set")

    def predict(
        self,
        text: str = Input(description="Any text, 1 to 200 characters", min_length=1, max_length=200),
        count: int = Input(description="How many times to repeat the text", default=3, ge=1, le=10),
        ratio: float = Input(description="A number from 0 to 1", default=0.5, ge=0.0, le=1.0),
        flag: bool = Input(description="A boolean", default=False),
        color: str = Input(description="A string choice", default="red", choices=["red", "green", "blue"]),
        size: int = Input(description="An integer choice", default=1, choices=[1, 2, 3]),
        code: str = Input(description="Letters then digits", default="ab12", regex="^[a-z]+[0-9]+$"),
        api_key: Secret = Input(description="A secret; only its length is echoed", default=None),
        note: Optional[str] = Input(description="Optional, without a default"),
        tags: List[str] = Input(description="A list with a default", default=["a", "b"]),
        legacy: bool = Input(description="Deprecated; ignored", default=False, deprecated=True),
        sleep: float = Input(description="Seconds to stay busy before answering", default=0.0, ge=0.0, le=600.0),
        fail: bool = Input(description="Fail the prediction on purpose", default=False),
    ) -> Output:
        print(f"conformance: text of {len(text)} characters, count {count}")
        if sleep > 0:
            print(f"conformance: sleeping {sleep:g} s")
            time.sleep(sleep)
        if fail:
            print("conformance: failing as asked")
            raise RuntimeError("failed on purpose: the `fail` input was true")
        secret = api_key.get_secret_value() if api_key is not None else None
        return Output(
            text=text * count,
            count=count,
            ratio=ratio,
            flag=flag,
            color=color,
            size=size,
            code=code,
            api_key_length=len(secret) if secret else 0,
            note_given=note is not None,
            tags=tags,
        )
