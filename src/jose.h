/*-------------------------------------------------------------------------
 *
 * jose.h
 *	  JOSE with OpenSSL: base64url and PS512 JWS (jws.c), RSA keys
 *	  (keys.c), the per-process cache of parsed contract keys (keycache.c),
 *	  verification of the API's answers against its JWKS (jwks.c).
 *
 * IDENTIFICATION
 *	  src/jose.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_JOSE_H
#define DIGIME_JOSE_H

#include "digime.h"

#include <openssl/evp.h>

/* ---------------------------------------------------------------------
 * jws.c — base64url, PS512 JWS signing and verification
 * ---------------------------------------------------------------------
 */
extern char *dm_base64url_encode(const unsigned char *data, size_t len);
/* NULL when not strict base64url (no padding, RFC 4648 §5 alphabet). */
extern unsigned char *dm_base64url_decode(const char *s, size_t len, size_t *outlen);

/* Compact JWS of header {"alg":"PS512","typ":"JWT"} and the given claims. */
extern char *dm_jws_sign_ps512(EVP_PKEY *key, const char *claims_json);

typedef struct DmJws
{
	Jsonb	   *header;
	Jsonb	   *payload;
	const char *signing_input;	/* "header.payload" */
	size_t		signing_input_len;
	unsigned char *signature;
	size_t		signature_len;
} DmJws;

/* Splits and decodes a compact JWS; false (never raises) when malformed. */
extern bool dm_jws_parse(const char *compact, DmJws *out);

/* PS512 (RSASSA-PSS, SHA-512, MGF1-SHA-512, salt 64) check; never raises. */
extern bool dm_jws_verify_ps512(EVP_PKEY *key, const DmJws *jws);

/* ---------------------------------------------------------------------
 * keys.c — RSA key handling
 * ---------------------------------------------------------------------
 */

/*
 * Parses a PEM private key (PKCS#1 or PKCS#8, unencrypted RSA >= 2048 bits).
 * On failure returns NULL and sets *why to a message naming the problem,
 * never the key.  The caller frees the key with EVP_PKEY_free.
 */
extern EVP_PKEY *dm_private_key_parse(const char *pem, const char **why);

/* Same for public keys (SPKI or PKCS#1 PEM), and RFC 7517 RSA n/e. */
extern EVP_PKEY *dm_public_key_from_pem(const char *pem);
extern EVP_PKEY *dm_public_key_from_jwk(const char *n_b64url, const char *e_b64url);

/* Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo; NULL on failure. */
extern char *dm_key_fingerprint(EVP_PKEY *key);

/* ---------------------------------------------------------------------
 * keycache.c — parsed contract keys, cached per process
 * ---------------------------------------------------------------------
 */

/*
 * The private key of a contract whose stored column value (PEM, or sealed
 * PEM) is "stored".  Parsed once per process and reused while the stored
 * value stays the same: a rotated key, a re-encrypted one or a contract
 * dropped and added again changes the stored value, so a stale key is never
 * used.  The returned reference belongs to memory context "owner" and is
 * released when that context is reset or deleted (also on error).
 * 22023/XX001 when the stored key is unusable.
 */
extern EVP_PKEY *dm_contract_key(const char *contract_id, const char *stored,
								 MemoryContext owner);

/* ---------------------------------------------------------------------
 * jwks.c — response-token verification against the API's JWKS
 * ---------------------------------------------------------------------
 */

/* Per-call state: the JWKS is refetched on an unknown kid once per call. */
typedef struct DmVerifyState
{
	bool		refetched;
} DmVerifyState;

/*
 * Verifies a response JWS (§3.5 of the protocol, hardened: PS512 only,
 * jku on the API's origin, exp/nbf enforced) and returns its payload.
 * May fetch the JWKS (a blocking request).
 */
extern Jsonb *dm_verify_response_token(const char *token, DmVerifyState *state);

/* Makes sure the JWKS of the configured API is cached (prefetch). */
extern void dm_jwks_prefetch(void);

#endif							/* DIGIME_JOSE_H */
