"""Who is signed in to the page (hosted mode), and so whose runs and artifacts it shows."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.quota import LimitReached
from studio.settings import Limits

# what a hosted studio lists while nobody is known yet (page build): nothing
NOBODY = "\x00nobody"
SIGN_IN = "Sign in first (the button at the top of the page), then try again."


@dataclass(frozen=True)
class User:
    name: str
    token: str | None = None  # the Hugging Face OAuth token (memory only): publishing uses it


def signed_in(request: gr.Request | None) -> User | None:
    """The user behind a request: a password sign-in (gradio auth) or Hugging Face OAuth."""
    if request is None:
        return None
    if getattr(request, "username", None):
        return User(request.username)
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    session = (
        scope.get("session", {}) if isinstance(scope, dict) else getattr(underlying, "session", {})
    )
    info = (session or {}).get("oauth_info") or {}
    name = (info.get("userinfo") or {}).get("preferred_username")
    if not name or (info.get("expires_at") or float("inf")) < time.time():
        return None
    return User(name, info.get("access_token"))


def viewer(limits: Limits | None, request: gr.Request | None) -> str | None:
    """Whose runs a request may see: None (all) on a single-user studio, else the signed-in
    user's name (NOBODY before a hosted studio's visitor signs in)."""
    if limits is None:
        return None
    user = signed_in(request)
    return NOBODY if user is None else user.name


def actor(limits: Limits | None, request: gr.Request | None) -> str | None:
    """The viewer of a request that acts: gr.Error when a hosted studio's visitor has not
    signed in."""
    owner = viewer(limits, request)
    if owner == NOBODY:
        raise gr.Error(SIGN_IN)
    return owner


def _named(handler: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    handler.__name__ = getattr(getattr(fn, "func", fn), "__name__", "handler")  # the API name
    return handler


def with_request(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Gradio handler calling fn(request, *inputs, **named) (Gradio passes the request only
    to a function whose parameter is annotated gr.Request: not to a lambda or a partial).
    `named` are an event's `inputs_kwargs`: form values by field name."""

    def handler(request: gr.Request, *inputs: Any, **named: Any) -> Any:
        return fn(request, *inputs, **named)

    return _named(handler, fn)


def for_viewer(limits: Limits | None, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Gradio handler that reads (a list, a poll): fn(owner, *inputs) with the viewer."""
    return _named(
        with_request(
            lambda request, *inputs, **named: fn(viewer(limits, request), *inputs, **named)
        ),
        fn,
    )


def for_user(limits: Limits | None, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Gradio handler that acts (submit, cancel, serve): fn(owner, *inputs, **named); a
    hosted studio's visitor must have signed in, and a limit reached is shown as the error it
    is."""
    if inspect.isgeneratorfunction(getattr(fn, "func", fn)):  # a streamed reply

        def handler(request: gr.Request, *inputs: Any, **named: Any) -> Any:
            try:
                yield from fn(actor(limits, request), *inputs, **named)
            except (LimitReached, PermissionError) as e:
                raise gr.Error(str(e)) from e

    else:

        def handler(request: gr.Request, *inputs: Any, **named: Any) -> Any:
            try:
                return fn(actor(limits, request), *inputs, **named)
            except (LimitReached, PermissionError) as e:
                raise gr.Error(str(e)) from e

    return _named(handler, fn)


def page_owner(limits: Limits | None) -> str | None:
    """The owner whose runs fill the lists while the page is built (nobody's when hosted)."""
    return None if limits is None else NOBODY


def describe(limits: Limits) -> str:
    parts = [
        f"uploads up to {limits.upload_mb} MB" if limits.upload_mb else "",
        f"{limits.rows:,} rows per dataset" if limits.rows else "",
        f"{limits.train_steps} training steps per run" if limits.train_steps else "",
        f"{limits.queued_runs} runs queued or running at once" if limits.queued_runs else "",
        f"{limits.servers} served model{'s' * (limits.servers != 1)}" if limits.servers else "",
    ]
    return ", ".join(p for p in parts if p)
