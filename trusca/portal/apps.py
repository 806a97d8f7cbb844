from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "trusca.portal"
    label = "portal"
    verbose_name = "Portal"
