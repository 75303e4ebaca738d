//! The front desk's view of every room in the venue's Redis (SPEC §4 "Venue"), on a box
//! started with `--redis`: `GET /venue` (a self-contained page that polls
//! `/venue.json` every second and shows the rooms as tiles) and `GET /venue.json`
//! ([`crate::mirror::venue`]).
//!
//! However many browsers poll, Redis is asked at most once per [`CACHE_FOR`]: one
//! request reads the venue (two round trips) while the others wait for its answer.
//! Room names and fields come from Redis and are shown with `textContent` only: a
//! room named `<script>` is text.

use crate::mirror::RedisUrl;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A venue read is reused for this long.
pub const CACHE_FOR: Duration = Duration::from_millis(400);
/// The venue read's deadline (connect and both round trips).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The last answer: when, its status, its body.
type Cached = Option<(Instant, StatusCode, Arc<String>)>;

#[derive(Clone)]
struct VenueWeb {
    url: Option<RedisUrl>,
    cache: Arc<tokio::sync::Mutex<Cached>>,
}

/// `/venue` and `/venue.json` over the Redis at `url` (`None`: the box has no
/// `--redis`; both answer 404 saying so).
pub fn routes(url: Option<RedisUrl>) -> Router {
    Router::new()
        .route("/venue", get(page))
        .route("/venue.json", get(json))
        .with_state(VenueWeb {
            url,
            cache: Arc::new(tokio::sync::Mutex::new(None)),
        })
}

fn no_redis() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "no venue: this box was started without --redis\n",
    )
        .into_response()
}

async fn json(State(v): State<VenueWeb>) -> Response {
    let Some(url) = &v.url else {
        return no_redis();
    };
    let mut cache = v.cache.lock().await;
    let (code, body) = match &*cache {
        Some((at, code, body)) if at.elapsed() < CACHE_FOR => (*code, body.clone()),
        _ => {
            let (code, body) = match crate::mirror::venue(url, READ_TIMEOUT).await {
                Ok(venue) => (
                    StatusCode::OK,
                    serde_json::to_string(&venue).unwrap_or_else(|e| {
                        serde_json::json!({ "error": e.to_string() }).to_string()
                    }),
                ),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "error": e.to_string() }).to_string(),
                ),
            };
            let body = Arc::new(body);
            *cache = Some((Instant::now(), code, body.clone()));
            (code, body)
        }
    };
    drop(cache);
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        (*body).clone(),
    )
        .into_response()
}

async fn page(State(v): State<VenueWeb>) -> Response {
    if v.url.is_none() {
        return no_redis();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// The front desk's page: no external resources, no innerHTML of Redis data.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bandsync · venue</title>
<style>
body{margin:0;font-family:system-ui,sans-serif;background:#111;color:#eee}
header{display:flex;justify-content:space-between;align-items:baseline;padding:12px 18px;background:#1b1b1b}
h1{font-size:20px;margin:0}#state{color:#aaa;font-size:14px}
#rooms{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px;padding:16px}
.tile{border-radius:10px;padding:12px 14px;background:#222;border-left:8px solid #555}
.tile.playing{border-left-color:#2ecc71;background:#1d2a21}
.tile.gone{opacity:.45;border-left-color:#333}
.name{font-size:18px;font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.tempo{font-size:34px;font-weight:700;margin:4px 0}
.meta{font-size:13px;color:#bbb;line-height:1.5}
.badge{display:inline-block;font-size:12px;padding:1px 7px;border-radius:8px;background:#444;margin-left:6px}
.playing .badge{background:#2ecc71;color:#000}
#invalid{padding:0 18px;color:#e67e22;font-size:13px}
</style></head>
<body>
<header><h1>Rooms</h1><div id="state">connecting…</div></header>
<div id="rooms"></div>
<div id="invalid"></div>
<script>
"use strict";
function el(tag, cls, text){const e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=text;return e}
function dur(s){const h=Math.floor(s/3600),m=Math.floor(s%3600/60);return h?h+" h "+m+" min":m+" min"}
function tile(r){
  const t=el("div","tile"+(r.gone?" gone":r.playing?" playing":""));
  const n=el("div","name",r.room);
  n.appendChild(el("span","badge",r.gone?"gone":r.playing?"playing":"stopped"));
  t.appendChild(n);
  t.appendChild(el("div","tempo",(Math.round(r.tempo*10)/10)+" BPM"));
  t.appendChild(el("div","meta","meter "+r.meter+" · "+(r.boxes||"?")+" box"+(r.boxes===1?"":"es")));
  t.appendChild(el("div","meta","song: "+(r.song==null?"–":r.song)));
  t.appendChild(el("div","meta","played today: "+dur(r.played_today_s)));
  t.appendChild(el("div","meta","updated "+new Date(r.updated_unix_ms).toLocaleTimeString()));
  return t;
}
async function poll(){
  try{
    const res=await fetch("/venue.json",{cache:"no-store"});
    const v=await res.json();
    if(!res.ok)throw new Error(v.error||res.status);
    const box=document.getElementById("rooms");
    box.replaceChildren(...v.rooms.map(tile));
    const playing=v.rooms.filter(r=>r.playing&&!r.gone).length;
    document.getElementById("state").textContent=v.rooms.length+" rooms · "+playing+" playing · "+new Date(v.now_unix_ms).toLocaleTimeString();
    document.getElementById("invalid").textContent=v.invalid.length?("unreadable: "+v.invalid.map(i=>i.room+" ("+i.error+")").join("; ")):"";
  }catch(e){document.getElementById("state").textContent="Redis unreachable: "+e.message}
  setTimeout(poll,1000);
}
poll();
</script>
</body></html>
"##;
