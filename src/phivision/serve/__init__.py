"""Putting a trained model to use: ``predict`` (JSON lines), ``serve`` (HTTP API + upload page), ``export``
(merge LoRA and write the official checkpoint layout). Import the submodules directly; nothing heavy loads here."""
