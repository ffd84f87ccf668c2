# digime — PGXS build.  `make && make install`, then `make installcheck`
# against a running server that has the test settings (see test/run-tests.sh).
EXTENSION   = digime
EXTVERSION  = 1.1
MODULE_big  = digime
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c src/worker/*.c)))
DATA        = digime--1.0.sql digime--1.0--1.1.sql
PGFILEDESC  = "digime - digi.me user authorization from SQL"

PG_CPPFLAGS = -Isrc -DDIGIME_VERSION='"$(EXTVERSION)"'
SHLIB_LINK  = -lcurl -lcrypto

REGRESS      = setup contracts authorize_url callback errors security
REGRESS_OPTS = --inputdir=. --outputdir=test/results --load-extension=digime

# isolation specs (specs/*.spec, expected/*.out), run by installcheck after REGRESS, in their own
# database; they reach the sandbox through the server's digime.onboard_url and digime.ca_file
ISOLATION      = callback_twice refresh_refresh refresh_revoke rotate_authorize batch_refresh
ISOLATION_OPTS = --outputdir=test/results/isolation --load-extension=digime

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

EXTRA_CLEAN = test/results

# PGXS tracks no header dependencies: every object depends on every header
$(OBJS): $(wildcard src/*.h src/worker/*.h)
