/*-------------------------------------------------------------------------
 *
 * keys.c
 *	  RSA keys through OpenSSL: contract private keys (PEM, PKCS#1 or
 *	  PKCS#8), the API's public keys (PEM or RFC 7517 n/e), fingerprints.
 *
 * Nothing here raises while an OpenSSL object is live; functions return
 * NULL and the caller reports.  Messages never quote key material.
 *
 * IDENTIFICATION
 *	  src/keys.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "jose.h"

#include "utils/builtins.h"

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

/* PS512 with jsonwebtoken, and digi.me, need RSA keys of >= 2048 bits */
#define MIN_RSA_BITS 2048

/* Encrypted PEM is refused; never let OpenSSL prompt on a terminal. */
static int
no_passphrase(char *buf, int size, int rwflag, void *u)
{
	return -1;
}

EVP_PKEY *
dm_private_key_parse(const char *pem, const char **why)
{
	BIO		   *bio;
	EVP_PKEY   *key;

	*why = NULL;
	if (strstr(pem, "-----BEGIN") == NULL)
	{
		*why = "The value is not PEM: it has no \"-----BEGIN\" line.";
		return NULL;
	}
	if (strstr(pem, "ENCRYPTED") != NULL)
	{
		*why = "Encrypted PEM keys are not supported; store the key unencrypted "
			"(digime.key_file encrypts it at rest).";
		return NULL;
	}
	bio = BIO_new_mem_buf(pem, -1);
	key = bio ? PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL) : NULL;
	BIO_free(bio);
	ERR_clear_error();
	if (key == NULL)
		*why = "OpenSSL could not parse a private key from the PEM text "
			"(PKCS#1 \"RSA PRIVATE KEY\" or PKCS#8 \"PRIVATE KEY\" expected).";
	else if (EVP_PKEY_get_base_id(key) != EVP_PKEY_RSA)
		*why = "The key is not an RSA key; PS512 needs RSA.";
	else if (EVP_PKEY_get_bits(key) < MIN_RSA_BITS)
		*why = "The RSA key is shorter than 2048 bits.";
	if (*why != NULL && key != NULL)
	{
		EVP_PKEY_free(key);
		key = NULL;
	}
	return key;
}

static EVP_PKEY *
check_public(EVP_PKEY *key)
{
	if (key != NULL &&
		(EVP_PKEY_get_base_id(key) != EVP_PKEY_RSA || EVP_PKEY_get_bits(key) < MIN_RSA_BITS))
	{
		EVP_PKEY_free(key);
		key = NULL;
	}
	return key;
}

EVP_PKEY *
dm_public_key_from_pem(const char *pem)
{
	EVP_PKEY   *key = NULL;
	OSSL_DECODER_CTX *dctx;
	const unsigned char *data = (const unsigned char *) pem;
	size_t		len = strlen(pem);

	/* structure NULL: accepts SPKI "PUBLIC KEY" and PKCS#1 "RSA PUBLIC KEY" */
	dctx = OSSL_DECODER_CTX_new_for_pkey(&key, "PEM", NULL, "RSA",
										 EVP_PKEY_PUBLIC_KEY, NULL, NULL);
	if (dctx != NULL && OSSL_DECODER_from_data(dctx, &data, &len) != 1)
		key = NULL;
	OSSL_DECODER_CTX_free(dctx);
	ERR_clear_error();
	return check_public(key);
}

EVP_PKEY *
dm_public_key_from_jwk(const char *n_b64url, const char *e_b64url)
{
	size_t		nlen,
				elen;
	unsigned char *n = dm_base64url_decode(n_b64url, strlen(n_b64url), &nlen);
	unsigned char *e = dm_base64url_decode(e_b64url, strlen(e_b64url), &elen);
	BIGNUM	   *bn_n = NULL,
			   *bn_e = NULL;
	OSSL_PARAM_BLD *bld = NULL;
	OSSL_PARAM *params = NULL;
	EVP_PKEY_CTX *ctx = NULL;
	EVP_PKEY   *key = NULL;

	if (n == NULL || e == NULL || nlen == 0 || elen == 0)
		return NULL;

	bn_n = BN_bin2bn(n, (int) nlen, NULL);
	bn_e = BN_bin2bn(e, (int) elen, NULL);
	bld = OSSL_PARAM_BLD_new();
	if (bn_n && bn_e && bld &&
		OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn_n) &&
		OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, bn_e) &&
		(params = OSSL_PARAM_BLD_to_param(bld)) != NULL &&
		(ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL)) != NULL &&
		EVP_PKEY_fromdata_init(ctx) > 0)
	{
		if (EVP_PKEY_fromdata(ctx, &key, EVP_PKEY_PUBLIC_KEY, params) <= 0)
			key = NULL;
	}
	EVP_PKEY_CTX_free(ctx);
	OSSL_PARAM_free(params);
	OSSL_PARAM_BLD_free(bld);
	BN_free(bn_n);
	BN_free(bn_e);
	ERR_clear_error();
	return check_public(key);
}

char *
dm_key_fingerprint(EVP_PKEY *key)
{
	unsigned char *der = NULL;
	int			derlen = i2d_PUBKEY(key, &der);
	unsigned char digest[EVP_MAX_MD_SIZE];
	unsigned int dlen = 0;
	bool		ok;
	char	   *hex;

	ok = derlen > 0 && EVP_Digest(der, derlen, digest, &dlen, EVP_sha256(), NULL) == 1;
	OPENSSL_free(der);
	ERR_clear_error();
	if (!ok)
		return NULL;

	hex = palloc(dlen * 2 + 1);
	hex[hex_encode((const char *) digest, dlen, hex)] = '\0';
	return hex;
}
