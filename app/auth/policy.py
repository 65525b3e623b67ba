"""The access policy: what one caller may do and at which sites, the only thing services
ask about permissions. Built from the token's principal (`access_policy`).

"Which sites may this caller see" is defined here once, as a `SiteAccess`: every query of
clinical data takes one (`store.criteria.site_condition` turns it into SQL, the only place
that does), so a query cannot forget it. The server's own reads (recomputing responses, the
CLI) say so with `SYSTEM_ACCESS`; an export job reads with the access its request had.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

from app.auth.permissions import (
    Action,
    allowed_actions,
    authorize,
    authorize_observation_write,
    narrowed_sites,
)
from app.auth.principal import Principal
from app.kit.errors import Forbidden


@dataclass(frozen=True)
class SiteAccess:
    """Which sites' records a query may return; `sites` None: every site."""

    sites: frozenset[str] | None
    # Whose access this is, for a reader: "caller", "system: <work>", "export job".
    reason: str

    def sees_site(self, site: str | None) -> bool:
        # A record without a site (it should not exist) is visible to every-site access only.
        return self.sites is None or (site is not None and site in self.sites)

    @classmethod
    def recorded(cls, sites: frozenset[str] | None) -> SiteAccess:
        """The access a request had, kept with work done after it (a Bulk export job)."""
        return cls(sites, "recorded with a job")


# The server's own work, never a client's request: every site.
SYSTEM_ACCESS = SiteAccess(None, "system")


@dataclass(frozen=True)
class AccessPolicy:
    """A caller's permissions: its role and scopes (what), its sites (where)."""

    principal: Principal

    @property
    def sites(self) -> SiteAccess:
        """The sites whose records the caller may see (an admin: every site)."""
        return SiteAccess(None if self.principal.is_admin else self.principal.sites, "caller")

    @property
    def visible_sites(self) -> frozenset[str] | None:
        return self.sites.sites

    def sees_site(self, site: str | None) -> bool:
        """Whether the caller may see or touch a record at `site` (one already read)."""
        return self.sites.sees_site(site)

    def narrowed(self, requested: frozenset[str]) -> SiteAccess:
        """The caller's sites narrowed to those a request names (`site=`); naming one the
        caller does not hold is refused (403), never silently dropped."""
        return SiteAccess(narrowed_sites(self.principal, requested), "caller, narrowed")

    def require(self, resource_type: str, action: Action) -> None:
        """Raises `Forbidden` (with its WWW-Authenticate challenge) unless role and scopes
        allow `action` on `resource_type`."""
        authorize(self.principal, resource_type, action)

    def allows(self, resource_type: str, action: Action) -> bool:
        if action not in allowed_actions(self.principal.role, resource_type):
            return False
        with contextlib.suppress(Forbidden):
            authorize(self.principal, resource_type, action)
            return True
        return False

    def require_observation_write(self, kind: str | None) -> None:
        authorize_observation_write(self.principal, kind)


@lru_cache(maxsize=4096)
def access_policy(principal: Principal) -> AccessPolicy:
    """The policy of the caller `principal` (one per token: a principal is immutable)."""
    return AccessPolicy(principal)
