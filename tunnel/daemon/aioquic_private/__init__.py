"""The one place that touches aioquic's private state.

aioquic has no API for what the daemon needs at its speed (packets of DATAGRAM frames built
and read beside it, path MTU probes, a datagram size that changes, stateless reset tokens that
survive a restart, a channel binding, bounded queues), so these modules read and write its
private attributes, call its private methods and construct its internal objects. Nothing
outside this package does (tests/daemon/test_aioquic_boundary.py checks it, and that every
private name used here is in the list below): other modules call the functions here.

- :mod:`.state`: accessors for what other modules need to know (established, open, closing,
  current path, datagram size, the datagram and event queues, RTT, stream bytes unacknowledged,
  the peer's key, the channel binding, stateless resets) and the changes a new connection gets
  (:func:`.state.tune`, :class:`.state.ResettableConnection`), and the memory it gives back
  once the handshake is over (:func:`.state.shed_handshake_buffers`).
- :mod:`.fastpath`: the DATAGRAM fast path (sealing, opening, sending, receiving), sans-IO;
  the trio driver is :mod:`tunnel.daemon.driver`. It reads state directly, being per packet.
- :mod:`.pmtu`: path MTU probes, datagram-size changes and loss counts.

Checked against aioquic 1.7.0, 1.7.1 and 1.7.2, by diffing their sources and running
tests/daemon/test_fastpath.py, test_fastpath_side_by_side.py, test_pmtu_probe.py and
test_inmemory_peers.py with each. From 1.7.1 to 1.7.2 the modules used here
(``quic/connection.py``, ``recovery.py``, ``packet_builder.py``, ``crypto.py``, ``stream.py``,
``congestion/``, ``_crypto.py``) changed only in type annotations and string formatting. From
1.7.0 to 1.7.1 ``connection.py`` gained checks none of the state below takes part in (which
destination connection IDs a server accepts, a client's Retry handling, discarding 0-RTT keys
on the first 1-RTT packet), ``crypto.py`` the QUIC v2 key-update label and ``stream.py`` final
size checks. Anything outside 1.7.x needs the same check again; :mod:`tunnel.daemon.aioquic_version`
refuses to start with it.

What is used, by object (r: read, w: written, c: called, o: overridden):

``QuicConnection``
    ``_state`` (r), ``_handshake_confirmed`` (r), ``_close_pending`` (r), ``_quic_logger`` (r),
    ``_is_client`` (r), ``_version`` (r), ``_configuration`` (r: ``max_datagram_frame_size``),
    ``_network_paths`` (r; a path's ``addr``, ``is_validated`` r, ``bytes_sent`` w),
    ``_peer_cid`` (r: ``cid``, ``stateless_reset_token``), ``_host_cids`` (r; their
    ``stateless_reset_token`` w), ``_spaces`` and ``_cryptos`` (r: the 1-RTT packet space and
    keys; the space's ``ack_at`` w, to acknowledge at once), ``_loss`` (r), ``_streams``
    (r), ``_datagrams_pending`` (r, and w in place: popped, evicted), ``_events`` (r, and w
    in place: appended, popped), ``_ping_pending``,
    ``_probe_pending``, ``_retire_connection_ids`` (r), ``_ack_delay`` (r), ``_packet_number``
    (r, w), ``_spin_bit`` (r, w), ``_spin_highest_pn`` (r, w), ``_close_at`` (r, w),
    ``_ack_eliciting_sent_since_receipt`` (r, w), ``_max_datagram_size`` (r, w),
    ``_local_max_streams_bidi`` and ``_local_max_streams_uni`` (w), ``_crypto_buffers`` (w:
    replaced by empty ones once the handshake completes), ``_QuicConnection__frame_handlers``
    (w in place: the epoch sets shared between connections), ``_idle_timeout()`` (c),
    ``_payload_received()`` (c), ``_replenish_connection_ids()`` (o, calling aioquic's),
    ``_local_ack_delay_exponent`` (r), ``_remote_preferred_address`` (r), ``_pacing_at``
    (w: after an ACK the fast path sent, as aioquic's sender sets it), ``_on_ack_delivery``
    (the delivery handler of an ACK the fast path sent).
    Ours, set on the connection: ``_tunnel_one_rtt`` (the 1-RTT space and keys, looked up
    once), ``_tunnel_live_cid`` (``host_cid`` while still issued: the fast receiver's) and,
    on :class:`.state.ResettableConnection`, ``_reset_tokens`` and
    ``_derive_reset_tokens()``.
``QuicConnection.tls`` (``aioquic.tls.Context``)
    ``_peer_certificate`` (r).
``QuicPacketRecovery`` (``_loss``)
    ``_pacer`` (r, w: replaced by our pacer), ``_cc`` (r), ``_rtt_initialized`` (r),
    ``_rtt_smoothed`` (r), ``_on_packets_lost()`` (o on the instance, calling aioquic's), and
    its public ``on_packet_sent()``, ``get_probe_timeout()``.
``QuicPacketPacer`` (``_loss._pacer``)
    ``_max_datagram_size`` (r, w), ``packet_time``, ``bucket_time``, ``bucket_max`` (r, w),
    ``update_rate()`` (o in our subclass), ``next_send_time()``, ``update_after_send()`` (c).
Congestion controller (``_loss._cc``, Reno or CUBIC)
    ``_max_datagram_size``, ``additive_increase_factor``, ``congestion_window`` (w),
    ``bytes_in_flight`` (r), ``on_packet_acked()`` (o on the instance, calling aioquic's).
``CryptoPair``, ``CryptoContext``
    ``_update_key_requested`` (r), ``send`` and ``recv`` with their ``aead``, ``hp``,
    ``key_phase``, ``secret`` (r).
``aioquic._crypto.AEAD`` and ``HeaderProtection`` (a private module)
    ``_aead`` (r: the ``cryptography`` AEAD, called), ``_iv`` (r), ``_mask()`` (c).
``QuicPacketSpace`` (1-RTT)
    ``expected_packet_number``, ``largest_received_packet``, ``largest_received_time``,
    ``ack_at``, ``ack_queue``, ``received_packets`` (r, w), ``discarded`` (r).
``QuicStream``
    ``sender._buffer_start``, ``sender._buffer_stop`` (r), ``sender.buffer_is_empty``,
    ``sender.reset_pending``, ``receiver.stop_pending`` (r).
Internal classes constructed
    ``QuicSentPacket`` (with our delivery handler for probes, aioquic's for ACKs),
    ``QuicReceiveContext``,
    ``Limit``; ``QuicPacketPacer`` subclassed; ``DatagramFrameReceived`` appended to
    ``_events`` directly.
"""
