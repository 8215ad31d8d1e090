//! The web view under `/ui/` of the admin listener: the node's flows with `ward
//! observe`'s filters and a pod's policies as `ward policy show` lists them. Plain
//! HTML, CSS and JavaScript embedded in the binary (no CDN, no build step); the page
//! reads `/v1/status`, `/v1/events` and `/v1/show` of the same listener, so it is served
//! where the admin endpoint is (loopback by default).

/// An embedded file: content type and bytes.
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// The file for a path under `/ui/` (`""` is the page).
pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, body): (&str, &[u8]) = match path {
        "" | "index.html" => ("text/html; charset=utf-8", include_bytes!("ui/index.html")),
        "app.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("ui/app.js"),
        ),
        "style.css" => ("text/css; charset=utf-8", include_bytes!("ui/style.css")),
        _ => return None,
    };
    Some(Asset { content_type, body })
}
