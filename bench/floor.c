/*
 * floor.c — the OpenSSL floor of digime's cryptography (bench/run.sh cpu).
 *
 *     cc -O2 -o floor bench/floor.c -lcrypto
 *     ./floor [--key PEM] [--seconds S] [--repeats R] [--msg-bytes B] [--ops sign,verify,parse]
 *
 * Times, openssl-speed style (each repeat runs the operation back to back for
 * S seconds and counts; the result is the median of R repeats), on one core:
 *
 *   sign     PS512 with the contract key: EVP_DigestSign over B bytes with
 *            SHA-512, RSASSA-PSS, MGF1-SHA-512, salt length 64 (what digime
 *            does for every request JWT; a fresh EVP_MD_CTX per signature,
 *            the key parsed once and reused, as digime's key cache does)
 *   verify   PS512 verification of such a signature with the 2048-bit public
 *            key alone (an EVP_PKEY made from the DER SubjectPublicKeyInfo,
 *            as a JWKS key is), a fresh EVP_MD_CTX per verification
 *   parse    PEM_read_bio_PrivateKey of the key (for reference: what a key
 *            cache saves per call)
 *
 * CPU time of the process (CLOCK_PROCESS_CPUTIME_ID) per operation in
 * microseconds, comparable with the /proc CPU counters bench/sections.py reads;
 * wall time alongside.  Prints one line per operation, then one JSON line.
 * The floor of a full authorization (authorize + code exchange) is
 * 2 sign + 2 verify: each of the two requests signs one client JWT and
 * verifies one answer JWT.
 */
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_REPEATS 101

static void
die(const char *what)
{
	fprintf(stderr, "floor: %s\n", what);
	ERR_print_errors_fp(stderr);
	exit(1);
}

static double
now(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
set_pss(EVP_PKEY_CTX *pctx)
{
	if (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
		EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha512()) <= 0 ||
		EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 64) <= 0)
		die("cannot set PSS parameters");
}

static size_t
ps512_sign(EVP_PKEY *key, const unsigned char *msg, size_t len, unsigned char *sig, size_t cap)
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	EVP_PKEY_CTX *pctx = NULL;
	size_t		siglen = cap;

	if (md == NULL || EVP_DigestSignInit(md, &pctx, EVP_sha512(), NULL, key) <= 0)
		die("EVP_DigestSignInit");
	set_pss(pctx);
	if (EVP_DigestSign(md, sig, &siglen, msg, len) <= 0)
		die("EVP_DigestSign");
	EVP_MD_CTX_free(md);
	return siglen;
}

static int
ps512_verify(EVP_PKEY *pub, const unsigned char *msg, size_t len, const unsigned char *sig,
			 size_t siglen)
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	EVP_PKEY_CTX *pctx = NULL;
	int			ok;

	if (md == NULL || EVP_DigestVerifyInit(md, &pctx, EVP_sha512(), NULL, pub) <= 0)
		die("EVP_DigestVerifyInit");
	set_pss(pctx);
	ok = EVP_DigestVerify(md, sig, siglen, msg, len);
	EVP_MD_CTX_free(md);
	return ok == 1;
}

/* Shared state of the timed operations. */
static EVP_PKEY *priv_key,
		   *pub_key;
static unsigned char msg[65536];
static size_t msg_len;
static unsigned char sig[1024];
static size_t sig_len;
static char *pem_text;
static long pem_len;

static void
op_sign(void)
{
	unsigned char s[1024];

	(void) ps512_sign(priv_key, msg, msg_len, s, sizeof(s));
}

static void
op_verify(void)
{
	if (!ps512_verify(pub_key, msg, msg_len, sig, sig_len))
		die("the signature does not verify");
}

static void
op_parse(void)
{
	BIO		   *bio = BIO_new_mem_buf(pem_text, (int) pem_len);
	EVP_PKEY   *k = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);

	if (k == NULL)
		die("PEM_read_bio_PrivateKey");
	EVP_PKEY_free(k);
	BIO_free(bio);
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

typedef struct Result
{
	const char *name;
	double		cpu_us;			/* median over repeats, CPU time per op */
	double		wall_us;		/* median over repeats, wall time per op */
	double		cpu_min_us,
				cpu_max_us;
	long		ops;			/* total */
} Result;

static Result
measure(const char *name, void (*op) (void), double seconds, int repeats)
{
	double		cpu[MAX_REPEATS],
				wall[MAX_REPEATS];
	Result		r = {name, 0, 0, 0, 0, 0};

	for (int i = 0; i < 20; i++)	/* warm-up: caches, lazy initialisation */
		op();
	for (int rep = 0; rep < repeats; rep++)
	{
		double		c0 = now(CLOCK_PROCESS_CPUTIME_ID),
					w0 = now(CLOCK_MONOTONIC),
					c1;
		long		n = 0;

		do
		{
			op();
			n++;
		} while ((c1 = now(CLOCK_PROCESS_CPUTIME_ID)) - c0 < seconds);
		cpu[rep] = (c1 - c0) / n * 1e6;
		wall[rep] = (now(CLOCK_MONOTONIC) - w0) / n * 1e6;
		r.ops += n;
	}
	qsort(cpu, repeats, sizeof(double), cmp_double);
	qsort(wall, repeats, sizeof(double), cmp_double);
	r.cpu_us = repeats % 2 ? cpu[repeats / 2] : (cpu[repeats / 2 - 1] + cpu[repeats / 2]) / 2;
	r.wall_us = repeats % 2 ? wall[repeats / 2] : (wall[repeats / 2 - 1] + wall[repeats / 2]) / 2;
	r.cpu_min_us = cpu[0];
	r.cpu_max_us = cpu[repeats - 1];
	return r;
}

int
main(int argc, char **argv)
{
	const char *key_file = "test/fixtures/keys/second.pem";
	double		seconds = 0.5;
	int			repeats = 5;
	FILE	   *f;
	BIO		   *bio;
	unsigned char *der = NULL;
	const unsigned char *p;
	int			der_len;
	Result		res[3];
	const char *ops = "sign,verify,parse";
	int			nres = 0;

	msg_len = 400;
	for (int i = 1; i < argc; i++)
	{
		const char *a = argv[i];

		if (i + 1 < argc && strcmp(a, "--key") == 0)
			key_file = argv[++i];
		else if (i + 1 < argc && strcmp(a, "--seconds") == 0)
			seconds = atof(argv[++i]);
		else if (i + 1 < argc && strcmp(a, "--repeats") == 0)
			repeats = atoi(argv[++i]);
		else if (i + 1 < argc && strcmp(a, "--msg-bytes") == 0)
			msg_len = (size_t) atol(argv[++i]);
		else if (i + 1 < argc && strcmp(a, "--ops") == 0)
			ops = argv[++i];
		else
		{
			fprintf(stderr, "usage: %s [--key PEM] [--seconds S] [--repeats R] [--msg-bytes B] "
					"[--ops sign,verify,parse]\n", argv[0]);
			return 2;
		}
	}
	if (seconds <= 0 || repeats < 1 || repeats > MAX_REPEATS || msg_len < 1 ||
		msg_len > sizeof(msg))
		die("--seconds must be > 0, --repeats 1..101, --msg-bytes 1..65536");

	/* the key, as PEM text (parsed for every "parse" op) and parsed once */
	if ((f = fopen(key_file, "rb")) == NULL)
		die("cannot open the key file");
	fseek(f, 0, SEEK_END);
	pem_len = ftell(f);
	fseek(f, 0, SEEK_SET);
	pem_text = malloc(pem_len + 1);
	if (pem_text == NULL || fread(pem_text, 1, pem_len, f) != (size_t) pem_len)
		die("cannot read the key file");
	fclose(f);
	bio = BIO_new_mem_buf(pem_text, (int) pem_len);
	if ((priv_key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)) == NULL)
		die("not a private key");
	BIO_free(bio);
	if (EVP_PKEY_get_base_id(priv_key) != EVP_PKEY_RSA)
		die("not an RSA key");

	/* the public key alone, as a verifier holds it */
	if ((der_len = i2d_PUBKEY(priv_key, &der)) <= 0)
		die("i2d_PUBKEY");
	p = der;
	if ((pub_key = d2i_PUBKEY(NULL, &p, der_len)) == NULL)
		die("d2i_PUBKEY");
	OPENSSL_free(der);

	/* a JWT-like signing input: base64url characters and one dot */
	for (size_t i = 0; i < msg_len; i++)
		msg[i] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[(i * 7919) % 64];
	if (msg_len > 40)
		msg[36] = '.';
	sig_len = ps512_sign(priv_key, msg, msg_len, sig, sizeof(sig));
	if (!ps512_verify(pub_key, msg, msg_len, sig, sig_len))
		die("self-check: the signature does not verify");

	if (strstr(ops, "sign"))
		res[nres++] = measure("sign", op_sign, seconds, repeats);
	if (strstr(ops, "verify"))
		res[nres++] = measure("verify", op_verify, seconds, repeats);
	if (strstr(ops, "parse"))
		res[nres++] = measure("parse", op_parse, seconds, repeats);

	printf("OpenSSL floor (%s; %d-bit RSA key %s; %zu-byte message; median of %d x %.2f s, CPU time per op)\n",
		   OpenSSL_version(OPENSSL_VERSION), EVP_PKEY_get_bits(priv_key), key_file, msg_len,
		   repeats, seconds);
	printf("%-8s %12s %12s %12s %12s %10s\n", "op", "cpu us/op", "min", "max", "wall us/op", "ops");
	for (int i = 0; i < nres; i++)
		printf("%-8s %12.1f %12.1f %12.1f %12.1f %10ld\n", res[i].name, res[i].cpu_us,
			   res[i].cpu_min_us, res[i].cpu_max_us, res[i].wall_us, res[i].ops);
	if (nres >= 2 && strcmp(res[0].name, "sign") == 0 && strcmp(res[1].name, "verify") == 0)
		printf("flow floor (2 sign + 2 verify): %.1f us\n", 2 * res[0].cpu_us + 2 * res[1].cpu_us);
	printf("{\"openssl\": \"%s\", \"key_bits\": %d, \"msg_bytes\": %zu, \"repeats\": %d, \"seconds\": %.3f",
		   OpenSSL_version(OPENSSL_VERSION), EVP_PKEY_get_bits(priv_key), msg_len, repeats, seconds);
	for (int i = 0; i < nres; i++)
		printf(", \"%s_us\": %.2f, \"%s_wall_us\": %.2f", res[i].name, res[i].cpu_us, res[i].name,
			   res[i].wall_us);
	printf("}\n");
	EVP_PKEY_free(priv_key);
	EVP_PKEY_free(pub_key);
	free(pem_text);
	return 0;
}
