"""What the HTTP handlers share: settings, the stores' engine, Temporal and Slack clients."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from pagerloop_sdk.pricing import DEFAULT_PRICES, PriceTable
from slack_sdk import WebClient
from sqlalchemy import Engine
from temporalio.client import Client

from config import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    temporal: Client
    slack: WebClient | None
    prices: PriceTable = DEFAULT_PRICES


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
