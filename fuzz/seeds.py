#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Deterministic; run it again after changing a seed. The fuzzer adds its own finds beside
them (minimised with `cargo fuzz cmin`). Tokens use the keys of callgate::fuzzing::keyring().
"""
import hashlib, hmac, json, os, struct
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

HERE = os.path.dirname(os.path.abspath(__file__))
NOW = 1_800_000_000


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def ctr(key, iv, data):
    e = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return e.update(data) + e.finalize()


def hmac_token(app, key, xml, iv=b"\x05" * 16):
    enc = hmac.new(key, b"callgate token v1 encryption", hashlib.sha256).digest()[: len(key)]
    mac = hmac.new(key, b"callgate token v1 mac", hashlib.sha256).digest()
    ct = ctr(enc, iv, xml.encode())
    tag = hmac.new(mac, app.encode() + b":" + iv + ct, hashlib.sha256).digest()
    return f"{app}:{(iv + ct + tag).hex()}"


ACCOUNT = '<account login="1001" password="p&amp;w" domain="sip.example.com" outboundProxy="127.0.0.1:5060" visibleName="A" expires="{}"/>'
put("token", "valid-crm", hmac_token("crm", b"\x01" * 32, ACCOUNT.format(NOW + 600)))
put("token", "crm-too-long-lived", hmac_token("crm", b"\x01" * 32, ACCOUNT.format(NOW + 86400)))
put("token", "crm-children", hmac_token("crm", b"\x01" * 32,
    f"<a><login>1001</login><password><![CDATA[x]]></password><domain>d</domain><expires>{NOW + 60}</expires></a>"))
put("token", "valid-old", "old:" + ctr(b"\x02" * 32, b"\x07" * 16, ACCOUNT.format("").replace(' expires=""', "").encode()).hex())
put("token", "old-second-key", "old:" + ctr(b"\x03" * 32, b"\x07" * 16, b'<a login="1" password="p" domain="d" port="5080"/>').hex())
put("token", "malformed", "crm:zz")
put("token", "unknown", "nope:00112233")

INVITE = (
    "INVITE sip:1001@127.0.0.1:5070 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1;rport\r\n"
    "Max-Forwards: 70\r\nFrom: \"Bob\" <sip:1002@127.0.0.1>;tag=a\r\nTo: <sip:1001@127.0.0.1>\r\n"
    "Call-ID: 1@x\r\nCSeq: 1 INVITE\r\nContact: <sip:1002@127.0.0.1:5062>\r\n"
    "P-Asserted-Identity: <sip:+4930123@pbx>\r\nContent-Type: application/sdp\r\n"
)
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 6000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
)
put("sip_message", "invite", INVITE + f"Content-Length: {len(SDP)}\r\n\r\n" + SDP)
put("sip_message", "options", "OPTIONS sip:127.0.0.1 SIP/2.0\r\nv: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-2\r\n"
    "f: <sip:x@y>;tag=1\r\nt: <sip:z@y>\r\ni: 2@x\r\nCSeq: 7 OPTIONS\r\nl: 0\r\n\r\n")
put("sip_message", "401", "SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-3\r\n"
    "From: <sip:1001@d>;tag=1\r\nTo: <sip:1001@d>;tag=2\r\nCall-ID: 3@x\r\nCSeq: 1 REGISTER\r\n"
    "WWW-Authenticate: Digest realm=\"d\", nonce=\"abc\", qop=\"auth,auth-int\", algorithm=MD5, opaque=\"o\"\r\n"
    "Expires: 99999999999999\r\nContent-Length: 0\r\n\r\n")
put("sip_message", "bye", "BYE sip:1001@127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-4\r\n"
    "From: <sip:1002@x>;tag=a\r\nTo: <sip:1001@x>;tag=b\r\nCall-ID: 1@x\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
put("sip_message", "refer", "REFER sip:1001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-5\r\n"
    "From: <sip:1002@x>;tag=a\r\nTo: <sip:1001@x>;tag=b\r\nCall-ID: 1@x\r\nCSeq: 3 REFER\r\n"
    "Refer-To: <sip:%2B1900555@provider?Replaces=abc%40x%3Bto-tag%3Db>\r\nContent-Length: 0\r\n\r\n")
put("sip_message", "unknown-method", "FOO sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-6\r\nCall-ID: c\r\nCSeq: 1 FOO\r\n\r\n")

put("sip_sdp", "g711", SDP)
put("sip_sdp", "hold-ipv6", SDP.replace("IP4 127.0.0.1", "IP6 ::1").replace("sendrecv", "sendonly"))
put("sip_sdp", "zero-addr", SDP.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0") + "m=video 0 RTP/AVP 96\r\n")

CHROME = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "a=extmap-allow-mixed\r\na=msid-semantic: WMS 8b5c\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
    "a=candidate:1 1 udp 2122260223 127.0.0.1 54321 typ host generation 0\r\n"
    "a=ice-ufrag:Xy7q\r\na=ice-pwd:3Bb5y0dKcPNeH5wqhHjJ2Fn0\r\na=ice-options:trickle\r\n"
    "a=fingerprint:sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n"
    "a=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=msid:8b5c 1f2e\r\na=rtcp-mux\r\n"
    "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:63 red/48000/2\r\n"
    "a=rtpmap:9 G722/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:13 CN/8000\r\n"
    "a=rtpmap:110 telephone-event/48000\r\na=rtpmap:126 telephone-event/8000\r\na=ssrc:1001 cname:abc\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sctp-port:5000\r\n"
)
put("webrtc_sdp", "chrome", CHROME)
put("webrtc_sdp", "firefox-like", CHROME.replace("a=setup:actpass", "a=setup:active").replace("sendrecv", "recvonly"))
put("webrtc_sdp", "no-fingerprint", "\n".join(l for l in CHROME.split("\n") if "fingerprint" not in l))


def stun_request(username, pwd, nominate):
    attrs = b""
    def attr(t, v):
        return struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) % 4)
    attrs += attr(0x0006, username.encode())
    attrs += attr(0x8029, b"\x00" * 8)  # ICE-CONTROLLING
    if nominate:
        attrs += attr(0x0025, b"")
    tid = b"\x11" * 12
    # MESSAGE-INTEGRITY over the header with the length including it.
    hdr = struct.pack("!HHI", 0x0001, len(attrs) + 24, 0x2112A442) + tid
    mi = hmac.new(pwd.encode(), hdr + attrs, hashlib.sha1).digest()
    attrs += attr(0x0008, mi)
    hdr = struct.pack("!HHI", 0x0001, len(attrs) + 8, 0x2112A442) + tid
    import zlib
    fp = (zlib.crc32(hdr + attrs) ^ 0x5354554E) & 0xFFFFFFFF
    attrs += attr(0x8028, struct.pack("!I", fp))
    return struct.pack("!HHI", 0x0001, len(attrs), 0x2112A442) + tid + attrs


put("stun", "check-ours", stun_request("ours:theirs", "our-password-of-22-chars", True))
put("stun", "check-wrong-password", stun_request("ours:theirs", "guess", False))
put("stun", "check-other-ufrag", stun_request("someone:else", "x", False))


def rtp(pt, seq, ts, ssrc, payload, marker=False, csrc=(), ext=None, pad=0):
    b0 = 0x80 | (len(csrc)) | (0x10 if ext is not None else 0) | (0x20 if pad else 0)
    out = struct.pack("!BBHII", b0, pt | (0x80 if marker else 0), seq, ts, ssrc)
    out += b"".join(struct.pack("!I", c) for c in csrc)
    if ext is not None:
        out += struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext
    out += payload
    if pad:
        out += b"\x00" * (pad - 1) + bytes([pad])
    return out


put("rtp", "pcmu", rtp(0, 1, 160, 0xCA11ED, b"\xff" * 160))
put("rtp", "dtmf-5-end", rtp(101, 2, 320, 1, bytes([5, 0x80 | 10, 0x03, 0x20]), marker=True))
put("rtp", "csrc-ext-pad", rtp(8, 3, 480, 2, b"\xd5" * 160, csrc=(7, 8), ext=b"\x10\xff\x00\x00", pad=4))

sr = struct.pack("!BBHI", 0x81, 200, 12, 0xAABB) + struct.pack("!IIIII", 1, 2, 3, 4, 5) \
    + struct.pack("!IIIIII", 0xCA11ED, 0x01000010, 100, 20, 0x11223344, 0x10)
sdes = struct.pack("!BBHI", 0x81, 202, 3, 0xAABB) + b"\x01\x03abc" + b"\x00"
put("rtcp", "sr-sdes", sr + sdes)
put("rtcp", "rr", struct.pack("!BBHI", 0x81, 201, 7, 1) + struct.pack("!IIIIII", 2, 0x02000001, 5, 3, 0, 0))
put("rtcp", "bye-truncated", struct.pack("!BBHI", 0x81, 203, 9, 1))

for i, req in enumerate([
    {"type": "connect", "id": 1, "token": "crm:00"},
    {"type": "resume", "id": 1, "sessionId": "s-00"},
    {"type": "call", "id": 2, "to": "+1 (900) 555-0100", "sdp": "v=0\r\n"},
    {"type": "call", "id": 3, "to": "sip:%2B1900555@provider", "sdp": ""},
    {"type": "answer", "id": 4, "callId": "c-1", "sdp": "v=0"},
    {"type": "hold", "id": 5, "callId": "c-1"},
    {"type": "ice", "id": 5, "callId": "c-1", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0},
    {"type": "reject", "id": 5, "callId": "c-1", "code": 486},
    {"type": "dtmf", "id": 6, "callId": "c-1", "digits": "123#*ABCD,"},
    {"type": "transfer", "id": 7, "callId": "c-1", "to": "tel:+49900123;phone-context=x"},
    {"type": "completeTransfer", "id": 7, "callId": "c-1", "consultId": "c-2"},
    {"type": "consult", "id": 8, "callId": "c-1", "to": "1003", "sdp": ""},
    {"type": "logout", "id": 9},
]):
    put("page_json", f"{i:02}-{req['type']}", json.dumps(req))
