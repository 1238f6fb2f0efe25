"""The browser pages the front end serves: the storefront (`storefront`) and the live
cluster page (`clusterpage`), plain HTML built with `html`."""
