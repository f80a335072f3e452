"""`/v1/templates`: the templates this server can start sandboxes from (Erebus)."""

from __future__ import annotations

from aiohttp import web

from tartarus.api.types import TemplateEntry, TemplateList
from tartarus.auth.rbac import AUTHENTICATED
from tartarus.images.store import TemplateInfo
from tartarus.server.access import SHARED, register_owner
from tartarus.server.context import manager
from tartarus.server.routing import Reply, RouteTable, reply

routes = RouteTable()

# Templates are shared by every tenant; a missing one is the handler's 404.
register_owner("template", lambda request, name: SHARED, lambda name: f"template {name}")


def template_entry(info: TemplateInfo) -> TemplateEntry:
    manifest = info.manifest
    return TemplateEntry(
        name=info.id,
        description=info.description,
        builtin=info.builtin,
        built=info.built,
        backends=list(manifest.backends) if manifest else [],
        size_bytes=manifest.size_bytes if manifest else None,
        resources=manifest.resources if manifest else None,
        timeout_s=manifest.timeout_s if manifest else None,
    )


@routes.route(
    "GET",
    "/v1/templates",
    summary="List templates",
    tag="templates",
    permission=AUTHENTICATED,
    replies=(Reply(200, TemplateList),),
)
async def list_templates(request: web.Request) -> web.StreamResponse:
    """Built-in and registered templates, and whether each is built yet (the first
    sandbox of a template that is not builds it)."""
    infos = await manager(request).provider.list_templates()
    return reply(TemplateList(items=[template_entry(i) for i in infos]))


@routes.route(
    "GET",
    "/v1/templates/{template}",
    summary="Get a template",
    tag="templates",
    permission=AUTHENTICATED,
    replies=(Reply(200, TemplateEntry),),
    errors=(404,),
)
async def get_template(request: web.Request) -> web.StreamResponse:
    info = await manager(request).provider.template(request.match_info["template"])
    return reply(template_entry(info))
