"""`steer serve` over the fake engine, as a process of its own: for what needs a real process
(a SIGKILL) but no real model. `python -m tests.server.fake_server CONFIG PORT`."""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn
from steering_server.app import create_app
from steering_server.settings import ServerSettings

from steering.config import read_deployment
from tests.server.fake_engine import FakeEngine
from tests.server.test_protocol import API_KEY, MAX_MODEL_LEN

if __name__ == "__main__":
    config, port = Path(sys.argv[1]), int(sys.argv[2])
    engine = FakeEngine(read_deployment(config), max_model_len=MAX_MODEL_LEN)
    settings = ServerSettings(config=config, port=port, api_key=API_KEY)
    uvicorn.run(create_app(settings, engine=engine), host="127.0.0.1", port=port, log_level="warning")
