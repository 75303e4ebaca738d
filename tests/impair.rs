//! `BANDSYNC_TEST_IMPAIR` on real quinn endpoints over loopback (127.0.0.1 only).
//!
//! Test names start with `impair_` so `cargo test impair` selects them.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bandsync::net::impair::{make_endpoint, make_endpoint_with_stats, Impairment};

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

struct Pair {
    _server_ep: quinn::Endpoint,
    client_ep: quinn::Endpoint,
    client: quinn::Connection,
    server: quinn::Connection,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // A realistic LAN guess rather than the spec's 333 ms, so handshakes under loss
    // recover in tens of milliseconds instead of seconds.
    t.initial_rtt(Duration::from_millis(10));
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
    Arc::new(t)
}

/// A client and a server endpoint on 127.0.0.1 and one connection between them.
async fn pair(client_imp: Option<Impairment>, server_imp: Option<Impairment>) -> Pair {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(ck.cert.der().to_vec());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());

    let mut server_cfg = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).unwrap();
    server_cfg.transport_config(transport());
    let server_ep = make_endpoint(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        UdpSocket::bind(LOOPBACK).unwrap(),
        server_imp,
    )
    .unwrap();

    // Trust exactly the server's self-signed certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client_cfg = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
    client_cfg.transport_config(transport());
    let mut client_ep = make_endpoint(
        quinn::EndpointConfig::default(),
        None,
        UdpSocket::bind(LOOPBACK).unwrap(),
        client_imp,
    )
    .unwrap();
    client_ep.set_default_client_config(client_cfg);

    let server_addr = server_ep.local_addr().unwrap();
    assert!(server_addr.ip().is_loopback());
    let accept = {
        let ep = server_ep.clone();
        tokio::spawn(async move {
            ep.accept()
                .await
                .expect("incoming")
                .await
                .expect("server handshake")
        })
    };
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        client_ep.connect(server_addr, "localhost").unwrap(),
    )
    .await
    .expect("handshake in time")
    .expect("client handshake");
    let server = accept.await.unwrap();
    Pair {
        _server_ep: server_ep,
        client_ep,
        client,
        server,
    }
}

/// Server side: answer every bi stream with its length (u64 LE) and FNV-1a hash (u64 LE).
fn serve_echo_digest(conn: quinn::Connection) {
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let data = recv.read_to_end(16 << 20).await.expect("read request");
                let mut reply = (data.len() as u64).to_le_bytes().to_vec();
                reply.extend_from_slice(&fnv(&data).to_le_bytes());
                send.write_all(&reply).await.expect("write reply");
                send.finish().unwrap();
            });
        }
    });
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Send `data` on a fresh bi stream, check the server's digest, return the elapsed time.
async fn request(conn: &quinn::Connection, data: &[u8]) -> Duration {
    let t0 = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(data).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(64).await.unwrap();
    let elapsed = t0.elapsed();
    assert_eq!(reply.len(), 16);
    assert_eq!(
        u64::from_le_bytes(reply[..8].try_into().unwrap()),
        data.len() as u64
    );
    assert_eq!(
        u64::from_le_bytes(reply[8..].try_into().unwrap()),
        fnv(data)
    );
    elapsed
}

/// Min round trip over 20 small requests, and quinn's RTT estimate afterwards.
async fn measure_rtt(p: &Pair) -> (Duration, Duration) {
    serve_echo_digest(p.server.clone());
    let mut best = Duration::MAX;
    for i in 0..20u8 {
        best = best.min(request(&p.client, &[i]).await);
    }
    (best, p.client.rtt())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impair_none_loopback_rtt_is_small() {
    let p = pair(None, None).await;
    let (best, rtt) = measure_rtt(&p).await;
    eprintln!("plain: best request/response {best:?}, conn.rtt() {rtt:?}");
    assert!(best < Duration::from_millis(15), "best round trip {best:?}");
    assert!(rtt < Duration::from_millis(15), "conn.rtt() {rtt:?}");
    p.client.close(0u32.into(), b"done");
    p.client_ep.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impair_delay_20ms_raises_rtt() {
    // Only the client's outgoing traffic is late: every round trip crosses it once.
    let imp = Impairment::parse("delay_ms=20,seed=1").unwrap();
    let p = pair(Some(imp), None).await;
    let (best, rtt) = measure_rtt(&p).await;
    eprintln!("delay_ms=20: best request/response {best:?}, conn.rtt() {rtt:?}");
    assert!(
        best >= Duration::from_millis(20),
        "best round trip {best:?}"
    );
    assert!(rtt >= Duration::from_millis(20), "conn.rtt() {rtt:?}");
    // Sanity: the delay is roughly what was asked for, not wildly more.
    assert!(
        best < Duration::from_millis(500),
        "best round trip {best:?}"
    );
    // The server sees the same path.
    assert!(
        p.server.rtt() >= Duration::from_millis(20),
        "server rtt {:?}",
        p.server.rtt()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impair_loss_30pct_streams_complete_datagrams_thin_out() {
    // Both directions lose 30 %: handshake, data and ACKs all suffer.
    let c_imp = Impairment::parse("loss=0.3,seed=11").unwrap();
    let s_imp = Impairment::parse("loss=0.3,seed=12").unwrap();
    let p = pair(Some(c_imp), Some(s_imp)).await;
    serve_echo_digest(p.server.clone());

    // (1) A reliable transfer completes intact: QUIC retransmits what was lost.
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let took = tokio::time::timeout(Duration::from_secs(8), request(&p.client, &data))
        .await
        .expect("transfer in time");
    eprintln!("loss=0.3: 200 kB bi-stream transfer took {took:?}");

    // (2) Unreliable QUIC datagrams client → server arrive at a rate clearly below 100 %.
    let received = Arc::new(AtomicUsize::new(0));
    {
        let conn = p.server.clone();
        let received = received.clone();
        tokio::spawn(async move {
            while conn.read_datagram().await.is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // 1000-byte datagrams: one per UDP packet, so each meets its own loss draw (small
    // ones would be bundled, and the count would swing in steps of a whole bundle).
    let size = p
        .client
        .max_datagram_size()
        .expect("datagrams enabled")
        .min(1000);
    assert!(size > 600, "max datagram size {size}");
    // Paced in batches of 10 that each wait for the previous ones to leave quinn's send
    // buffer: under loss, congestion control may hold datagrams back for a while, and
    // they must not be counted as lost just because they have not been sent yet.
    const N: usize = 300;
    let empty = p.client.datagram_send_buffer_space();
    let deadline = Instant::now() + Duration::from_secs(6);
    let t0 = Instant::now();
    let drained = || async {
        while p.client.datagram_send_buffer_space() < empty && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    for i in 0..N as u32 {
        if i % 10 == 0 {
            drained().await;
        }
        p.client.send_datagram(datagram(i, size)).unwrap();
    }
    drained().await;
    assert_eq!(
        p.client.datagram_send_buffer_space(),
        empty,
        "datagrams still unsent after 6 s"
    );
    // Sent; with no delay configured they land within milliseconds on loopback.
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!("loss=0.3: sending {N} datagrams took {:?}", t0.elapsed());
    let got = received.load(Ordering::Relaxed);
    let rate = got as f64 / N as f64;
    eprintln!(
        "loss=0.3: {got}/{N} datagrams arrived ({:.0} %)",
        rate * 100.0
    );
    assert!(rate < 0.9, "delivery rate {rate}");
    assert!(rate > 0.4, "delivery rate {rate} (far more lost than 30 %)");
}

fn datagram(i: u32, size: usize) -> bytes::Bytes {
    let mut v = i.to_le_bytes().to_vec();
    v.resize(size, 0xab);
    v.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impair_stats_count_losses_on_a_real_socket() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let imp = Impairment::parse("loss=1,seed=3").unwrap();
    let sock = UdpSocket::bind(LOOPBACK).unwrap();
    let (ep, stats) =
        make_endpoint_with_stats(quinn::EndpointConfig::default(), None, sock, Some(imp)).unwrap();
    let stats = stats.expect("impaired endpoint has counters");
    let mut roots = rustls::RootCertStore::empty();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ck.cert.der().to_vec(),
        ))
        .unwrap();
    let cfg = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
    // Nobody listens there, and everything is dropped anyway: the attempt only feeds the counters.
    let target = UdpSocket::bind(LOOPBACK).unwrap();
    let connecting = ep
        .connect_with(cfg, target.local_addr().unwrap(), "localhost")
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), connecting).await;
    let c = stats.counts();
    assert!(c.lost >= 1, "{c:?}");
    assert_eq!(c.sent, 0, "{c:?}");
    target.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        target.recv_from(&mut buf).is_err(),
        "loss=1 let a datagram through"
    );
}
