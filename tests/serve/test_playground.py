"""The playground at / in headless Chromium: a typed message gets a streamed reply, a refusal is shown."""

from __future__ import annotations

import pytest

from tests.serve.conftest import LiveServer


@pytest.mark.slow
def test_playground_streams_a_reply_to_a_typed_message(server: LiveServer, page) -> None:
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.fill("#input", "hello there")
    page.click("#send")
    assert page.locator(".msg.user").inner_text() == "hello there"
    page.wait_for_selector(".stats")  # shown once the stream has ended: "N tokens · X tokens/s · reason"
    reply = page.locator(".msg.assistant").inner_text()
    assert reply.strip() and "tokens/s" in page.locator(".stats").inner_text()
    # a conversation grown past the 64-token context (with a 24-token reply): the server's refusal is
    # shown, not a reply
    page.fill("#input", "and now a much longer message that will not fit")
    page.click("#send")
    page.wait_for_selector(".msg.error")
    assert "context" in page.locator(".msg.error").inner_text()
