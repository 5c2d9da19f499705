"""Every key ``mmupt config keys`` lists is read by code outside the config modules: a key nothing reads is a setting
that does nothing (as trainer.warmup_steps and trainer.deterministic once were). Read by name: an attribute or a
string of the key's last part (a same-named attribute elsewhere would hide a dead key; none does today)."""

import re
from pathlib import Path

from mmupt_megatron.config_docs import describe_keys

PACKAGE = Path(__file__).parents[1] / "mmupt_megatron"
READ_THROUGH = {"rollout.n_vote": "num_voters"}
"""Keys the code reads through a config method (the method's name is what must be read outside)."""


def _unread_keys() -> list[str]:
    texts = {path: path.read_text() for path in PACKAGE.rglob("*.py") if not path.name.startswith("config")}
    unread = []
    for key, *_ in describe_keys():
        name = READ_THROUGH.get(key, key.rsplit(".", 1)[-1])
        read = re.compile(rf"\.{re.escape(name)}\b|[\"']{re.escape(name)}[\"']")
        if not any(read.search(text) for text in texts.values()):
            unread.append(key)
    return unread


def test_every_listed_key_is_read_outside_the_config_modules():
    assert len(describe_keys()) > 100
    assert _unread_keys() == []


def test_the_check_sees_a_key_nothing_reads(monkeypatch):
    import mmupt_megatron.config_docs as docs

    listed = describe_keys()
    monkeypatch.setattr(docs, "describe_keys", lambda: [*listed, ("trainer.no_such_setting_read", "", 0, "")])
    monkeypatch.setitem(globals(), "describe_keys", docs.describe_keys)
    assert _unread_keys() == ["trainer.no_such_setting_read"]
