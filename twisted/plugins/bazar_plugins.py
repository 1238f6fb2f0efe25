# One line of wiring per command; each module is imported only when its plugin runs.
from twisted.application.service import ServiceMaker

bazar_frontend = ServiceMaker("Bazar front end", "bazar.frontend",
                              "Bazar's public HTTP API with its cache.", "bazar-frontend")
bazar_catalog = ServiceMaker("Bazar catalog", "bazar.catalog",
                             "One replica of Bazar's catalog service.", "bazar-catalog")
bazar_order = ServiceMaker("Bazar order", "bazar.order",
                           "One replica of Bazar's order service.", "bazar-order")
bazar_cluster = ServiceMaker("Bazar cluster", "bazar.cluster",
                             "The whole store on one machine, supervised.", "bazar-cluster")
