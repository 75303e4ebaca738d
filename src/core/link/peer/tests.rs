use super::*;
use crate::core::link::codec::{
    decode, decode_discovery, decode_measurement, encode_ping, encode_pong_echo,
    MeasurementMessage, Message,
};
use crate::core::link::measurement::Measurement;
use crate::core::link::steer::CHAIN_PINGS;
use crate::core::link::timeline::{bpm_to_micros_per_beat, phase, ExactLine};

const ME: NodeId = NodeId([0xAA; 8]);
const LINK: NodeId = NodeId([0x11, 2, 3, 4, 5, 6, 7, 8]);
const T0: i64 = 1_000_000_000; // host µs at start

fn mep() -> SocketAddrV4 {
    "127.0.0.1:40000".parse().unwrap()
}
fn link_disc() -> SocketAddrV4 {
    "127.0.0.1:50000".parse().unwrap()
}
fn link_mep() -> SocketAddrV4 {
    "127.0.0.1:50001".parse().unwrap()
}

fn room_123() -> Timeline {
    Timeline {
        micros_per_beat: bpm_to_micros_per_beat(123.0),
        beat_origin: 0,
        time_origin: DEFAULT_GHOST_EPOCH_US + T0,
    }
}

fn authority() -> LinkPeer {
    let mut cfg = Config::new(mep());
    cfg.timeline = room_123();
    LinkPeer::new(ME, 42, cfg)
}

fn alive_from(node: NodeId, kind: DiscoveryKind, state: PeerState) -> Vec<u8> {
    encode_discovery(&DiscoveryMessage {
        header: DiscoveryHeader {
            kind,
            ttl: 5,
            group_id: 0,
            node_id: node,
        },
        state,
    })
}

fn link_state(session: NodeId, tl: Timeline, ss: StartStopState) -> PeerState {
    PeerState {
        timeline: Some(tl),
        session_id: Some(session),
        start_stop: Some(ss),
        measurement_v4: Some(link_mep()),
        ..Default::default()
    }
}

fn multicasts(a: &[Action]) -> Vec<DiscoveryMessage> {
    a.iter()
        .filter_map(|x| match x {
            Action::SendMulticast(b) => Some(decode_discovery(b).unwrap()),
            _ => None,
        })
        .collect()
}

fn events(a: &[Action]) -> Vec<Event> {
    a.iter()
        .filter_map(|x| match x {
            Action::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn unicasts(a: &[Action]) -> Vec<(SocketAddrV4, Message)> {
    a.iter()
        .filter_map(|x| match x {
            Action::SendTo(to, b) => Some((*to, decode(b).unwrap())),
            _ => None,
        })
        .collect()
}

#[test]
fn start_sends_alive_immediately_then_every_250ms() {
    let mut p = authority();
    assert!(p.handle_timeout(T0).is_empty(), "nothing before start");
    assert_eq!(p.next_timeout(), None);
    let a = p.start(T0);
    let m = multicasts(&a);
    assert_eq!(m.len(), 1);
    let alive = &m[0];
    assert_eq!(alive.header.kind, DiscoveryKind::Alive);
    assert_eq!(alive.header.ttl, 5);
    assert_eq!(alive.header.node_id, ME);
    assert_eq!(alive.state.session_id, Some(ME));
    assert_eq!(alive.state.measurement_v4, Some(mep()));
    assert_eq!(alive.state.start_stop, Some(StartStopState::default()));
    let tl = alive.state.timeline.unwrap();
    assert!(tl.same_line(&room_123()));
    assert_eq!(phase(tl.beat_origin, 48_000_000), 0);
    // 107 bytes, like the reference's plain IPv4 peer state.
    match &a[0] {
        Action::SendMulticast(b) => assert_eq!(b.len(), 107),
        _ => unreachable!(),
    }
    assert_eq!(p.next_timeout(), Some(T0 + 250_000));
    assert!(p.handle_timeout(T0 + 249_999).is_empty());
    assert_eq!(multicasts(&p.handle_timeout(T0 + 250_000)).len(), 1);
    assert_eq!(p.next_timeout(), Some(T0 + 500_000));
}

#[test]
fn alive_gets_response_and_peer_joined() {
    let mut p = authority();
    p.start(T0);
    let st = link_state(
        LINK,
        Timeline::from_bpm(90.0, 0.0, 0),
        StartStopState::default(),
    );
    let a = p.handle_datagram(
        T0 + 10,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Alive, st.clone()),
    );
    let u = unicasts(&a);
    // Response to the discovery source, then a ping to the foreign session's mep4.
    assert_eq!(u[0].0, link_disc());
    match &u[0].1 {
        Message::Discovery(d) => {
            assert_eq!(d.header.kind, DiscoveryKind::Response);
            assert_eq!(d.state.session_id, Some(ME));
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(u[1].0, link_mep());
    assert!(matches!(&u[1].1, Message::Measurement(m) if m.kind == MeasurementKind::Ping));
    let e = events(&a);
    assert_eq!(
        e[0],
        Event::PeerJoined {
            node_id: LINK,
            addr: link_disc(),
            session_id: Some(LINK)
        }
    );
    assert_eq!(
        e[1],
        Event::PeerSessionChanged {
            node_id: LINK,
            session_id: Some(LINK),
            in_our_session: false
        }
    );
    assert_eq!(p.peers().len(), 1);
    // A Response is processed like an Alive but not answered.
    let a = p.handle_datagram(
        T0 + 20,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert!(unicasts(&a).is_empty());
    assert!(events(&a).is_empty());
}

#[test]
fn alive_with_bad_payload_is_still_answered_but_not_tabled() {
    let mut p = authority();
    p.start(T0);
    let mut b = alive_from(LINK, DiscoveryKind::Alive, PeerState::default());
    b.extend_from_slice(&[0x73, 0x65, 0x73, 0x73, 0, 0, 0, 9, 1]); // overrun
    let a = p.handle_datagram(T0 + 1, link_disc(), &b);
    assert_eq!(unicasts(&a).len(), 1);
    assert!(p.peers().is_empty());
}

#[test]
fn own_id_group_and_garbage_are_ignored() {
    let mut p = authority();
    p.start(T0);
    let a = p.handle_datagram(
        T0 + 1,
        link_disc(),
        &alive_from(ME, DiscoveryKind::Alive, PeerState::default()),
    );
    assert!(a.is_empty());
    let mut g = alive_from(LINK, DiscoveryKind::Alive, PeerState::default());
    g[11] = 1; // groupId = 1
    assert!(p.handle_datagram(T0 + 2, link_disc(), &g).is_empty());
    assert!(p
        .handle_datagram(T0 + 3, link_disc(), b"garbage")
        .is_empty());
    assert!(p.peers().is_empty());
}

#[test]
fn responder_answers_pings_with_ghost_time_and_echo() {
    let mut p = authority();
    p.start(T0);
    let ping = encode_ping(777, Some(888));
    let now = T0 + 5_000;
    let a = p.handle_datagram(now, link_mep(), &ping);
    assert_eq!(a.len(), 1);
    match &a[0] {
        Action::SendTo(to, b) => {
            assert_eq!(*to, link_mep());
            assert_eq!(b.len(), 73);
            assert_eq!(&b[41..], &ping[9..]);
            let m = decode_measurement(b).unwrap();
            assert_eq!(m.kind, MeasurementKind::Pong);
            assert_eq!(m.payload.session_id, Some(ME));
            assert_eq!(m.payload.ghost_time, Some(now + DEFAULT_GHOST_EPOCH_US));
            assert_eq!(m.payload.host_time, Some(777));
            assert_eq!(m.payload.prev_ghost_time, Some(888));
        }
        x => panic!("{x:?}"),
    }
    // Payload > 32 bytes: ignored.
    let mut big = encode_ping(1, Some(2));
    big.extend_from_slice(&[0x7a, 0x7a, 0x7a, 0x7a, 0, 0, 0, 0]);
    assert!(p.handle_datagram(now, link_mep(), &big).is_empty());
    // Malformed payload: ignored.
    let mut bad = encode_ping(1, None);
    bad.pop();
    assert!(p.handle_datagram(now, link_mep(), &bad).is_empty());
}

#[test]
fn byebye_and_ttl_expiry_remove_peers() {
    let mut p = authority();
    p.start(T0);
    let other = NodeId([0x22; 8]);
    let st = link_state(ME, p.published_timeline(), StartStopState::default());
    p.handle_datagram(
        T0,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Alive, st.clone()),
    );
    p.handle_datagram(
        T0 + 100_000,
        "127.0.0.1:50002".parse().unwrap(),
        &alive_from(other, DiscoveryKind::Alive, st),
    );
    assert_eq!(p.session_peer_count(), 2);
    let bye = alive_from(LINK, DiscoveryKind::ByeBye, PeerState::default());
    let a = p.handle_datagram(T0 + 200_000, link_disc(), &bye);
    assert_eq!(
        events(&a),
        vec![Event::PeerLeft {
            node_id: LINK,
            reason: LeaveReason::ByeBye
        }]
    );
    // Unknown ByeBye: no effect.
    assert!(events(&p.handle_datagram(T0 + 200_001, link_disc(), &bye)).is_empty());
    // `other` expires at T0+100ms+5s; prune at that + 1 s.
    let prune_at = T0 + 100_000 + 5_000_000 + 1_000_000;
    let mut t = T0 + 200_001;
    let mut left = vec![];
    while t < prune_at + 10 {
        let nt = p.next_timeout().unwrap();
        assert!(nt >= t);
        t = nt;
        left.extend(events(&p.handle_timeout(t)));
        if !left.is_empty() {
            break;
        }
    }
    assert_eq!(t, prune_at);
    assert_eq!(
        left,
        vec![Event::PeerLeft {
            node_id: other,
            reason: LeaveReason::Expired
        }]
    );
    assert!(p.peers().is_empty());
}

#[test]
fn peer_table_is_bounded() {
    let mut cfg = Config::new(mep());
    cfg.max_peers = 4;
    cfg.measure_foreign_sessions = false;
    let mut p = LinkPeer::new(ME, 1, cfg);
    p.start(T0);
    let mut evicted = 0;
    for i in 0..10u8 {
        let id = NodeId([i + 1; 8]);
        let a = p.handle_datagram(
            T0 + i as i64,
            link_disc(),
            &alive_from(id, DiscoveryKind::Alive, PeerState::default()),
        );
        evicted += events(&a)
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::PeerLeft {
                        reason: LeaveReason::Evicted,
                        ..
                    }
                )
            })
            .count();
    }
    assert_eq!(p.peers().len(), 4);
    assert_eq!(evicted, 6);
}

#[test]
fn shutdown_sends_byebye_and_goes_quiet() {
    let mut p = authority();
    p.start(T0);
    let a = p.shutdown(T0 + 1);
    match &a[..] {
        [Action::SendMulticast(b)] => {
            assert_eq!(b.len(), 20);
            let d = decode_discovery(b).unwrap();
            assert_eq!(d.header.kind, DiscoveryKind::ByeBye);
            assert_eq!(d.header.ttl, 0);
        }
        x => panic!("{x:?}"),
    }
    assert!(p.shutdown(T0 + 2).is_empty());
    assert!(p.handle_timeout(T0 + 1_000_000).is_empty());
    assert!(p
        .handle_datagram(T0 + 3, link_mep(), &encode_ping(1, None))
        .is_empty());
    assert_eq!(p.next_timeout(), None);
}

#[test]
fn remote_tempo_change_is_overruled_by_beat_origin() {
    let mut p = authority();
    p.start(T0);
    let ours = p.published_timeline();
    // A Link member changes tempo: larger beat origin, per Ch. 2 §6 rule 3.
    let g = p.ghost_time(T0 + 1_000_000);
    let b_now = ours.beats_at(g);
    let theirs = Timeline {
        micros_per_beat: bpm_to_micros_per_beat(90.0),
        beat_origin: b_now.max(ours.beat_origin + 1),
        time_origin: g,
    };
    let st = link_state(ME, theirs, StartStopState::default());
    let a = p.handle_datagram(
        T0 + 1_000_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    let ev = events(&a);
    let Some(Event::RemoteTimelineChange {
        node_id,
        timeline,
        overruled_with: Some(win),
    }) = ev
        .iter()
        .find(|e| matches!(e, Event::RemoteTimelineChange { .. }))
        .cloned()
    else {
        panic!("{ev:?}")
    };
    assert_eq!(node_id, LINK);
    assert_eq!(timeline, theirs);
    // Wins the priority rule, same line as the room, on the anchor grid.
    assert!(win.beat_origin > theirs.beat_origin);
    assert!(win.same_line(&room_123()));
    assert_eq!(phase(win.beat_origin, 48_000_000), 0);
    // Gossiped at once (last Alive was 1 s ago, spacing satisfied).
    let m = multicasts(&a);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].state.timeline, Some(win));
    assert_eq!(p.published_timeline(), win);
    // When the member adopts ours, nothing more happens.
    let st = link_state(ME, win, StartStopState::default());
    let a = p.handle_datagram(
        T0 + 1_100_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert!(events(&a).is_empty());
    // A stale timeline (lower origin) is ignored.
    let st = link_state(ME, ours, StartStopState::default());
    let a = p.handle_datagram(
        T0 + 1_200_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert!(events(&a).is_empty());
}

#[test]
fn equal_origin_conflict_is_also_overruled() {
    let mut p = authority();
    p.start(T0);
    let ours = p.published_timeline();
    let theirs = Timeline {
        micros_per_beat: 600_000,
        ..ours
    };
    let a = p.handle_datagram(
        T0 + 10,
        link_disc(),
        &alive_from(
            LINK,
            DiscoveryKind::Response,
            link_state(ME, theirs, StartStopState::default()),
        ),
    );
    assert!(p.published_timeline().beat_origin > ours.beat_origin);
    // Spacing: last Alive at T0, so the overrule Alive waits until T0+50ms.
    assert!(multicasts(&a).is_empty());
    assert_eq!(p.next_timeout(), Some(T0 + 50_000));
    let m = multicasts(&p.handle_timeout(T0 + 50_000));
    assert_eq!(m[0].state.timeline, Some(p.published_timeline()));
}

#[test]
fn no_auto_overrule_reports_once_and_set_timeline_wins() {
    let mut cfg = Config::new(mep());
    cfg.timeline = room_123();
    cfg.auto_overrule = false;
    let mut p = LinkPeer::new(ME, 1, cfg);
    p.start(T0);
    let ours = p.published_timeline();
    let theirs = Timeline {
        micros_per_beat: 600_000,
        beat_origin: ours.beat_origin + 5,
        time_origin: ours.time_origin,
    };
    let msg = alive_from(
        LINK,
        DiscoveryKind::Response,
        link_state(ME, theirs, StartStopState::default()),
    );
    let e1 = events(&p.handle_datagram(T0 + 10, link_disc(), &msg));
    let e2 = events(&p.handle_datagram(T0 + 20, link_disc(), &msg));
    assert_eq!(
        e1.last(),
        Some(&Event::RemoteTimelineChange {
            node_id: LINK,
            timeline: theirs,
            overruled_with: None
        })
    );
    assert!(e2.is_empty());
    assert_eq!(p.published_timeline(), ours);
    // The product answers by re-asserting the room: that must win.
    p.set_timeline(T0 + 100_000, room_123(), false);
    assert!(p.published_timeline().beat_origin > theirs.beat_origin);
    assert!(p.published_timeline().same_line(&room_123()));
}

#[test]
fn set_timeline_publishes_new_tempo_with_winning_origin() {
    let mut p = authority();
    p.start(T0);
    let before = p.published_timeline();
    let now = T0 + 10_000_000;
    let g = p.ghost_time(now);
    let room = p.room_timeline();
    let new_room = Timeline {
        micros_per_beat: bpm_to_micros_per_beat(140.0),
        beat_origin: room.beats_at(g),
        time_origin: g,
    };
    let a = p.set_timeline(now, new_room, false);
    let m = multicasts(&a);
    assert_eq!(m.len(), 1);
    let tl = m[0].state.timeline.unwrap();
    assert!(tl.beat_origin > before.beat_origin);
    assert!(tl.same_line(&new_room));
    // Same line again: no change.
    let a = p.set_timeline(now + 1, new_room, false);
    assert!(multicasts(&a).is_empty());
}

#[test]
fn start_stop_set_and_overrule() {
    let mut p = authority();
    p.start(T0);
    let a = p.set_timeline(T0 + 1_000_000, room_123(), true);
    let ss = multicasts(&a)[0].state.start_stop.unwrap();
    assert!(ss.is_playing);
    assert_eq!(ss.timestamp, p.ghost_time(T0 + 1_000_000));
    assert_eq!(ss.beats, room_123().beats_at(ss.timestamp));
    // A member stops the transport later: overruled with a later timestamp.
    let theirs = StartStopState {
        is_playing: false,
        beats: 0,
        timestamp: ss.timestamp + 500_000,
    };
    let st = link_state(ME, p.published_timeline(), theirs);
    let a = p.handle_datagram(
        T0 + 1_400_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    let ev = events(&a);
    let Some(Event::RemoteStartStopChange {
        overruled_with: Some(win),
        ..
    }) = ev.last().cloned()
    else {
        panic!("{ev:?}")
    };
    assert!(win.is_playing);
    assert!(win.timestamp > theirs.timestamp);
    assert_eq!(multicasts(&a)[0].state.start_stop, Some(win));
    // Older state from a member: ignored.
    let st = link_state(ME, p.published_timeline(), ss);
    assert!(events(&p.handle_datagram(
        T0 + 1_500_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st)
    ))
    .is_empty());
    // Stop from the product.
    let a = p.set_timeline(T0 + 2_000_000, room_123(), false);
    let s2 = multicasts(&a)[0].state.start_stop.unwrap();
    assert!(!s2.is_playing && s2.timestamp > win.timestamp);
}

/// A model of a Link app following Ch. 2 §7 (measure, join rule) and §6/§8
/// (priority rules) against the authority, exchanging real datagrams.
struct SimLink {
    id: NodeId,
    session: NodeId,
    /// ghost = host + intercept (host clock identical to the authority's here,
    /// but the Link app's own ghost starts at 0 when it founds its session).
    intercept: i64,
    timeline: Timeline,
    start_stop: StartStopState,
    measuring: Option<Measurement>,
    pending_foreign: Option<(NodeId, Timeline)>,
}

impl SimLink {
    fn new(now: i64) -> SimLink {
        SimLink {
            id: LINK,
            session: LINK,
            intercept: -now, // G = (1, −now): founding moment is ghost 0 (Ch. 2 §2)
            timeline: Timeline::from_bpm(90.0, 0.0, 0),
            start_stop: StartStopState::default(),
            measuring: None,
            pending_foreign: None,
        }
    }
    fn alive(&self) -> Vec<u8> {
        alive_from(
            self.id,
            DiscoveryKind::Alive,
            link_state(self.session, self.timeline, self.start_stop),
        )
    }
    /// Process what the authority sent; returns datagrams for the authority
    /// (destination, bytes).
    fn receive(
        &mut self,
        now: i64,
        to: SocketAddrV4,
        bytes: &[u8],
    ) -> Vec<(SocketAddrV4, Vec<u8>)> {
        let mut out = vec![];
        match decode(bytes).unwrap() {
            Message::Discovery(d) => {
                let st = d.state;
                if st.session_id == Some(self.session) {
                    if let Some(tl) = st.timeline {
                        if tl.beat_origin > self.timeline.beat_origin {
                            self.timeline = tl;
                        }
                    }
                    if let Some(ss) = st.start_stop {
                        if ss.timestamp > self.start_stop.timestamp {
                            self.start_stop = ss;
                        }
                    }
                } else if self.measuring.is_none() {
                    let (m, ping) =
                        Measurement::start(now, st.measurement_v4.unwrap(), st.session_id.unwrap());
                    self.measuring = Some(m);
                    out.push((st.measurement_v4.unwrap(), ping));
                    self.pending_foreign = Some((st.session_id.unwrap(), st.timeline.unwrap()));
                }
            }
            Message::Measurement(MeasurementMessage {
                kind: MeasurementKind::Pong,
                payload,
            }) => {
                assert_eq!(to, link_mep());
                if let Some(m) = self.measuring.as_mut() {
                    match m.handle_pong(now, &payload) {
                        Step::Continue(Some(p)) => out.push((mep(), p)),
                        Step::Done { intercept_us } => {
                            let (sid, tl) = self.pending_foreign.unwrap();
                            let g_new = now + intercept_us;
                            let g_cur = now + self.intercept;
                            if g_new - g_cur > JOIN_EPSILON_US
                                || ((g_new - g_cur).abs() < JOIN_EPSILON_US && sid < self.session)
                            {
                                self.session = sid;
                                self.intercept = intercept_us;
                                self.timeline = tl;
                                self.start_stop = StartStopState::default();
                            }
                            self.measuring = None;
                        }
                        s => panic!("{s:?}"),
                    }
                }
            }
            _ => {}
        }
        out
    }
}

#[test]
fn simulated_link_app_joins_our_session_and_follows_the_room() {
    let mut p = authority();
    let mut now = T0;
    let mut link = SimLink::new(now + 3_000_000); // founded its session 3 s after us... any time
    let mut queue: Vec<(SocketAddrV4, Vec<u8>)> = vec![];
    // Authority starts; Link hears the Alive.
    for a in p.start(now) {
        if let Action::SendMulticast(b) = a {
            queue.push((link_disc(), b));
        }
    }
    now += 3_000_000;
    // Link announces itself too.
    let mut to_auth: Vec<(SocketAddrV4, Vec<u8>)> = vec![(link_disc(), link.alive())];
    for _ in 0..500 {
        now += 100; // 100 µs per hop, symmetric
        let mut next_queue = vec![];
        for (from, b) in to_auth.drain(..) {
            for a in p.handle_datagram(now, from, &b) {
                match a {
                    Action::SendTo(to, b) => next_queue.push((to, b)),
                    Action::SendMulticast(b) => next_queue.push((link_disc(), b)),
                    Action::Event(_) => {}
                }
            }
        }
        now += 100;
        for (to, b) in queue.drain(..).chain(next_queue) {
            for (dest, reply) in link.receive(now, to, &b) {
                let from = if dest == mep() {
                    link_mep()
                } else {
                    link_disc()
                };
                to_auth.push((from, reply));
            }
        }
        if to_auth.is_empty() {
            break;
        }
    }
    assert_eq!(link.session, ME, "Link app joined the authority's session");
    // Its ghost transform is ours (symmetric delays → exact).
    assert_eq!(link.intercept, p.ghost_xform().intercept_us);
    assert_eq!(link.timeline, p.published_timeline());
    // Its beat at any host instant equals the room's.
    let t = now + 12_345_678;
    assert_eq!(
        link.timeline.beats_at(t + link.intercept),
        p.room_timeline().beats_at(p.ghost_time(t))
    );
}

#[test]
fn foreign_session_is_measured_and_reported() {
    let mut p = authority();
    p.start(T0);
    let st = link_state(
        LINK,
        Timeline::from_bpm(90.0, 0.0, 0),
        StartStopState::default(),
    );
    let link_intercept = -(T0 - 2_000_000); // Link founded its session 2 s before T0
    let mut now = T0 + 10;
    let a = p.handle_datagram(
        now,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Alive, st),
    );
    let mut ping = unicasts(&a)
        .into_iter()
        .find(|(to, _)| *to == link_mep())
        .map(|(_, m)| m);
    let mut report = None;
    for _ in 0..200 {
        let Some(Message::Measurement(m)) = ping.take() else {
            break;
        };
        assert_eq!(m.kind, MeasurementKind::Ping);
        now += 200;
        let ping_bytes = encode_ping(m.payload.host_time.unwrap(), m.payload.prev_ghost_time);
        let pong = encode_pong_echo(LINK, now + link_intercept, &ping_bytes[9..]);
        now += 200;
        let a = p.handle_datagram(now, link_mep(), &pong);
        ping = unicasts(&a)
            .into_iter()
            .find(|(to, _)| *to == link_mep())
            .map(|(_, m)| m);
        if let Some(e) = events(&a)
            .into_iter()
            .find(|e| matches!(e, Event::ForeignSession { .. }))
        {
            report = Some(e);
            break;
        }
    }
    assert_eq!(
        report,
        Some(Event::ForeignSession {
            session_id: LINK,
            ghost_delta_us: link_intercept - DEFAULT_GHOST_EPOCH_US,
            joins_us: true
        })
    );
    // Not measured again while the session is known.
    let st = link_state(
        LINK,
        Timeline::from_bpm(90.0, 0.0, 0),
        StartStopState::default(),
    );
    let a = p.handle_datagram(
        now + 1,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert!(unicasts(&a).is_empty());
}

#[test]
fn older_foreign_session_is_reported_as_not_joining() {
    let mut cfg = Config::new(mep());
    cfg.ghost = GhostXform { intercept_us: 0 }; // a badly configured authority
    let mut p = LinkPeer::new(ME, 1, cfg);
    p.start(T0);
    let st = link_state(
        LINK,
        Timeline::from_bpm(90.0, 0.0, 0),
        StartStopState::default(),
    );
    let mut now = T0;
    let a = p.handle_datagram(
        now,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Alive, st),
    );
    let mut ping = unicasts(&a)
        .into_iter()
        .find(|(to, _)| *to == link_mep())
        .map(|(_, m)| m);
    let mut report = None;
    while let Some(Message::Measurement(m)) = ping.take() {
        now += 100;
        let pb = encode_ping(m.payload.host_time.unwrap(), m.payload.prev_ghost_time);
        let a = p.handle_datagram(
            now,
            link_mep(),
            &encode_pong_echo(LINK, now + 10_000_000, &pb[9..]),
        );
        ping = unicasts(&a)
            .into_iter()
            .find(|(to, _)| *to == link_mep())
            .map(|(_, m)| m);
        report = events(&a)
            .into_iter()
            .find(|e| matches!(e, Event::ForeignSession { .. }))
            .or(report);
    }
    let Some(Event::ForeignSession {
        joins_us,
        ghost_delta_us,
        ..
    }) = report
    else {
        panic!()
    };
    assert!(!joins_us);
    assert!(
        (ghost_delta_us - 10_000_000).abs() <= 100,
        "{ghost_delta_us}"
    ); // one-way test delay → ≤ half-RTT bias
       // And we never join them: our session and timeline are unchanged.
    assert_eq!(p.session_id(), ME);
}

#[test]
fn foreign_measurement_timeout_is_reported_then_retried_after_backoff() {
    let mut p = authority();
    p.start(T0);
    let st = link_state(
        LINK,
        Timeline::from_bpm(90.0, 0.0, 0),
        StartStopState::default(),
    );
    p.handle_datagram(
        T0,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Alive, st.clone()),
    );
    let mut t = T0;
    let mut failed = None;
    let mut pings = 1;
    while failed.is_none() && t < T0 + 1_000_000 {
        t = p.next_timeout().unwrap();
        let a = p.handle_timeout(t);
        pings += unicasts(&a)
            .iter()
            .filter(|(to, _)| *to == link_mep())
            .count();
        failed = events(&a)
            .into_iter()
            .find(|e| matches!(e, Event::ForeignSessionMeasurementFailed { .. }));
    }
    assert_eq!(t, T0 + 300_000);
    assert_eq!(pings, 6);
    assert_eq!(
        failed,
        Some(Event::ForeignSessionMeasurementFailed {
            session_id: LINK,
            reason: FailReason::Timeout
        })
    );
    let a = p.handle_datagram(
        t + 10,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st.clone()),
    );
    assert!(unicasts(&a).is_empty(), "backoff");
    let a = p.handle_datagram(
        t + 1_000_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert_eq!(unicasts(&a).len(), 1, "re-measured after backoff");
}

#[test]
fn configured_initial_transport_is_stamped_at_start() {
    let mut cfg = Config::new(mep());
    cfg.timeline = room_123();
    cfg.playing = Some(true);
    let mut p = LinkPeer::new(ME, 1, cfg);
    let a = p.start(T0);
    let ss = multicasts(&a)[0].state.start_stop.unwrap();
    assert!(ss.is_playing);
    assert_eq!(ss.timestamp, p.ghost_time(T0)); // > 0, so Link peers adopt it
    assert_eq!(ss.beats, room_123().beats_at(ss.timestamp));
}

// ----- bandsync: one session per room, siblings, exact lines -----------------

const SESSION: NodeId = NodeId([0x5E; 8]);
const TAG: [u8; 4] = [0xB0, 0xB1, 0xB2, 0xB3];
const BOX_A: NodeId = NodeId([0xB0, 0xB1, 0xB2, 0xB3, 0, 0, 0, 1]);
const BOX_B: NodeId = NodeId([0xB0, 0xB1, 0xB2, 0xB3, 0, 0, 0, 2]);

fn line_123() -> ExactLine {
    ExactLine {
        b0: 0,
        t0_ns: (DEFAULT_GHOST_EPOCH_US + T0) * 1000,
        mbpm: 123_000,
    }
}

fn room_box(id: NodeId, room: &RoomState) -> LinkPeer {
    let mut cfg = Config::new(mep());
    cfg.session_id = Some(SESSION);
    cfg.sibling_tag = Some(TAG);
    let mut p = LinkPeer::new(id, 7, cfg);
    p.set_room(T0, room);
    p.start(T0);
    p
}

fn playing(line: ExactLine) -> RoomState {
    RoomState {
        line,
        playing: true,
        since_us: DEFAULT_GHOST_EPOCH_US + T0,
        accepted: vec![],
        next_transport: None,
    }
}

fn remote_events(a: &[Action]) -> Vec<Event> {
    events(a)
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::RemoteTimelineChange { .. } | Event::RemoteStartStopChange { .. }
            )
        })
        .collect()
}

#[test]
fn the_room_session_is_published_and_pongs_carry_it() {
    let mut p = room_box(BOX_A, &playing(line_123()));
    assert_eq!(p.session_id(), SESSION);
    let a = p.handle_timeout(T0 + 250_000);
    assert_eq!(multicasts(&a)[0].state.session_id, Some(SESSION));
    assert_eq!(multicasts(&a)[0].header.node_id, BOX_A);
    let a = p.handle_datagram(T0 + 300_000, link_mep(), &encode_ping(5, None));
    let (_, Message::Measurement(m)) = &unicasts(&a)[0] else {
        panic!()
    };
    assert_eq!(m.payload.session_id, Some(SESSION));
    assert_eq!(p.counters().pongs, 1);
}

#[test]
fn malformed_datagrams_are_counted() {
    let mut p = room_box(BOX_A, &playing(line_123()));
    p.handle_datagram(T0 + 1, link_disc(), b"garbage");
    p.handle_datagram(T0 + 2, link_disc(), b"_asdp_v\x01\x01");
    p.handle_datagram(T0 + 3, link_mep(), b"_link_v\x01\x01\x00\x00\x00\x01");
    let mut big = b"_link_v\x01\x01".to_vec();
    big.extend_from_slice(&[0; 40]);
    p.handle_datagram(T0 + 4, link_mep(), &big);
    assert_eq!(p.counters().bad, 4);
    assert_eq!(p.counters().datagrams, 4);
    assert!(p.peers().is_empty());
}

#[test]
fn siblings_and_relays_of_them_never_count_as_changes() {
    let room = playing(line_123());
    let mut a = room_box(BOX_A, &room);
    let mine = a.published_timeline();
    // B publishes the same line from a higher origin: A publishes exactly that.
    let higher = line_123().at(mine.beat_origin + 48 * MICROBEATS_PER_BEAT);
    let st = link_state(SESSION, higher, a.start_stop());
    let acts = a.handle_datagram(
        T0 + 10_000,
        link_disc(),
        &alive_from(BOX_B, DiscoveryKind::Alive, st),
    );
    assert!(remote_events(&acts).is_empty(), "{acts:?}");
    assert_eq!(a.published_timeline(), higher);
    // B on another line (its own group, before the rooms merge), with a later
    // transport state: not a Link app's change...
    let other = Timeline {
        micros_per_beat: 600_000,
        beat_origin: higher.beat_origin + 1,
        time_origin: higher.time_origin,
    };
    let b_ss = StartStopState {
        is_playing: false,
        beats: 0,
        timestamp: DEFAULT_GHOST_EPOCH_US + T0 + 5,
    };
    let st = link_state(SESSION, other, b_ss);
    let acts = a.handle_datagram(
        T0 + 20_000,
        link_disc(),
        &alive_from(BOX_B, DiscoveryKind::Alive, st),
    );
    assert!(remote_events(&acts).is_empty(), "{acts:?}");
    // ... nor a Link app that relays it.
    let st = link_state(SESSION, other, b_ss);
    let acts = a.handle_datagram(
        T0 + 30_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert!(remote_events(&acts).is_empty(), "{acts:?}");
    // A Link app's own proposal is overruled.
    let own = Timeline {
        micros_per_beat: 666_667,
        beat_origin: other.beat_origin + 7,
        time_origin: other.time_origin,
    };
    let st = link_state(SESSION, own, b_ss);
    let acts = a.handle_datagram(
        T0 + 40_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    let ev = remote_events(&acts);
    assert!(
        matches!(
            ev.as_slice(),
            [Event::RemoteTimelineChange {
                overruled_with: Some(_),
                ..
            }]
        ),
        "{ev:?}"
    );
    assert!(line_123().matches(&a.published_timeline()));
    assert!(a.published_timeline().beat_origin > own.beat_origin);
}

#[test]
fn the_rooms_scheduled_line_and_transport_are_not_changes() {
    let now_g = DEFAULT_GHOST_EPOCH_US + T0 + 1_000_000;
    let next = ExactLine {
        b0: 8,
        t0_ns: (now_g + 2_000_000) * 1000,
        mbpm: 100_000,
    };
    let mut room = playing(line_123());
    room.playing = false;
    room.accepted = vec![next];
    room.next_transport = Some((true, now_g + 2_000_000));
    let mut a = room_box(BOX_A, &room);
    let ours = a.published_timeline();
    // A Link app relaying the next line (another box switched a moment earlier).
    let tl = next.at(ours.beat_origin + 48 * MICROBEATS_PER_BEAT);
    let start = StartStopState {
        is_playing: true,
        beats: 8 * MICROBEATS_PER_BEAT,
        timestamp: now_g + 2_000_000,
    };
    let st = link_state(SESSION, tl, a.start_stop());
    let acts = a.handle_datagram(
        T0 + 1_000_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert!(remote_events(&acts).is_empty(), "{acts:?}");
    // The next transport state, long before it begins: overruled ...
    let st = link_state(SESSION, a.published_timeline(), start);
    let acts = a.handle_datagram(
        T0 + 1_100_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st.clone()),
    );
    assert_eq!(remote_events(&acts).len(), 1, "{acts:?}");
    // ... but not within the transition window before it begins.
    let late = StartStopState {
        timestamp: now_g + 2_000_001 + 500_000,
        ..start
    };
    let st = link_state(SESSION, a.published_timeline(), late);
    let acts = a.handle_datagram(
        T0 + 2_900_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Response, st),
    );
    assert!(remote_events(&acts).is_empty(), "{acts:?}");
}

#[test]
fn a_room_change_is_gossiped_at_once_on_the_exact_line() {
    let mut a = room_box(BOX_A, &playing(line_123()));
    a.handle_timeout(T0 + 250_000); // an Alive just went out
    let g = DEFAULT_GHOST_EPOCH_US + T0 + 260_000;
    let next = ExactLine {
        b0: 1,
        t0_ns: g * 1000,
        mbpm: 100_000,
    };
    let mut room = playing(next);
    room.since_us = g;
    let acts = a.set_room(T0 + 260_000, &room);
    let m = multicasts(&acts);
    assert_eq!(m.len(), 1, "not held back by the 50 ms spacing");
    let tl = m[0].state.timeline.unwrap();
    assert!(next.matches(&tl));
    assert_eq!(tl.micros_per_beat, 600_000);
    // Re-stating the same room sends nothing new.
    assert!(multicasts(&a.set_room(T0 + 270_000, &room)).is_empty());
}

#[test]
fn the_published_origin_follows_the_present_and_stays_on_the_exact_line() {
    let mut a = room_box(BOX_A, &playing(line_123()));
    let q = 48 * MICROBEATS_PER_BEAT;
    let mut origins = vec![];
    for i in 1..=2400 {
        // 10 minutes in 250 ms steps
        let now = T0 + i * 250_000;
        a.handle_timeout(now);
        let p = a.published_timeline();
        assert!(line_123().matches(&p));
        assert_eq!(p.beat_origin % q, 0);
        let now_beat = line_123().beats_at(a.ghost_time(now));
        assert!(
            (now_beat - p.beat_origin).abs() <= q / 2 + MICROBEATS_PER_BEAT,
            "{now_beat} vs {}",
            p.beat_origin
        );
        // The app's beat from the published (rounded-tempo) timeline vs the exact line.
        let err_us = (p.beats_at(a.ghost_time(now)) - now_beat) as f64 * 487_805.0 / 1e6;
        assert!(err_us.abs() < 5.0, "{err_us} µs at {i}");
        origins.push(p.beat_origin);
    }
    origins.dedup();
    assert!(
        origins.len() > 20,
        "re-anchored every 48 beats: {}",
        origins.len()
    );
}

#[test]
fn a_link_app_that_joins_gets_a_fresh_transport_stamp() {
    let mut a = room_box(BOX_A, &playing(line_123()));
    let before = a.start_stop();
    let now = T0 + 30_000_000;
    let st = link_state(SESSION, a.published_timeline(), StartStopState::default());
    let acts = a.handle_datagram(
        now,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Alive, st),
    );
    let ss = a.start_stop();
    assert_eq!((ss.is_playing, ss.beats), (before.is_playing, before.beats));
    assert_eq!(ss.timestamp, a.ghost_time(now));
    assert!(remote_events(&acts).is_empty());
    // A sibling appearing does not re-stamp.
    let st = link_state(SESSION, a.published_timeline(), ss);
    a.handle_datagram(
        now + 1_000,
        link_disc(),
        &alive_from(BOX_B, DiscoveryKind::Alive, st),
    );
    assert_eq!(a.start_stop(), ss);
}

#[test]
fn apps_in_our_session_are_probed_and_their_pongs_become_samples() {
    let mut cfg = Config::new(mep());
    cfg.timeline = room_123();
    cfg.steer_apps = true;
    let mut a = LinkPeer::new(ME, 42, cfg);
    a.start(T0);
    let ss = StartStopState::default();
    // a Link app joins our session
    a.handle_datagram(
        T0 + 1_000,
        link_disc(),
        &alive_from(LINK, DiscoveryKind::Alive, link_state(ME, room_123(), ss)),
    );
    // the app's clock: 300 µs ahead of our ghost clock and 100 ppm fast
    let app_ghost = |host: i64| {
        let g = a_ghost(host);
        g + 300 + (host - T0) / 10_000
    };
    let mut now = T0 + 2_000;
    let mut pings = 0;
    while now < T0 + 3_000_000 {
        // (when it was sent, what): each ping is answered 100 µs later, its pong
        // arrives 100 µs after that
        let mut out: Vec<(i64, Action)> = a
            .handle_timeout(now)
            .into_iter()
            .map(|x| (now, x))
            .collect();
        while let Some((sent, act)) = out.pop() {
            let Action::SendTo(to, bytes) = act else {
                continue;
            };
            if to != link_mep() {
                continue;
            }
            let Ok(Message::Measurement(m)) = decode(&bytes) else {
                continue;
            };
            if m.kind != MeasurementKind::Ping {
                continue;
            }
            pings += 1;
            let pong = encode_pong_echo(ME, app_ghost(sent + 100), &bytes[9..]);
            let back = sent + 200;
            out.extend(
                a.handle_datagram(back, link_mep(), &pong)
                    .into_iter()
                    .map(|x| (back, x)),
            );
        }
        now += 10_000;
    }
    assert!(pings >= 12 * CHAIN_PINGS as usize, "{pings} pings");
    let e = a.app_offset(now).expect("an estimate");
    let truth = (app_ghost(now) - a_ghost(now)) as f64;
    assert!((e.offset_us - truth).abs() < 5.0, "{e:?} vs {truth}");
    // the app pings us (its 30-s re-measurement): no estimate until new samples
    a.handle_datagram(now, link_mep(), &encode_ping(5, None));
    assert_eq!(a.app_offset(now), None);
}

/// The authority's ghost time at host `h` with the default transform.
fn a_ghost(h: i64) -> i64 {
    h + DEFAULT_GHOST_EPOCH_US
}

#[test]
fn the_room_line_a_steering_step_away_is_no_apps_change() {
    let mut cfg = Config::new(mep());
    cfg.steer_apps = true;
    let mut p = LinkPeer::new(ME, 42, cfg);
    let line = ExactLine {
        b0: 0,
        t0_ns: (DEFAULT_GHOST_EPOCH_US + T0) * 1000,
        mbpm: 123_000,
    };
    p.set_room(
        T0,
        &RoomState {
            line,
            playing: true,
            since_us: DEFAULT_GHOST_EPOCH_US + T0,
            accepted: Vec::new(),
            next_transport: None,
        },
    );
    p.start(T0);
    let now = T0 + 2_000_000;
    let origin = p.published_timeline().beat_origin + 1;
    let shifted = |us: i64| {
        let t = line.at(origin);
        Timeline {
            time_origin: t.time_origin + us,
            ..t
        }
    };
    // another box a step ahead (or an app relaying it): not an app's change
    let a = p.handle_datagram(
        now,
        link_disc(),
        &alive_from(
            LINK,
            DiscoveryKind::Response,
            link_state(ME, shifted(150), StartStopState::default()),
        ),
    );
    assert!(
        !events(&a)
            .iter()
            .any(|e| matches!(e, Event::RemoteTimelineChange { .. })),
        "{a:?}"
    );
    // 5 ms off is beyond any step: an app moved the beat, overruled
    let a = p.handle_datagram(
        now + 100_000,
        link_disc(),
        &alive_from(
            LINK,
            DiscoveryKind::Response,
            link_state(ME, shifted(5_000), StartStopState::default()),
        ),
    );
    assert!(
        events(&a)
            .iter()
            .any(|e| matches!(e, Event::RemoteTimelineChange { .. })),
        "{a:?}"
    );
}
