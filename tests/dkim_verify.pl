#!/usr/bin/perl
# Verify the DKIM signatures of one message with Mail::DKIM (not dkimpy,
# which signed it), looking keys up in the tests' DNS server.
#
#   perl tests/dkim_verify.pl PORT < message.eml
#
# Prints one JSON object: {"result": ..., "detail": ..., "signatures":
# [{"result", "detail", "domain", "selector", "algorithm"}, ...]}.
# Debian: libmail-dkim-perl libnet-dns-perl (JSON::PP is core Perl).
# Mail::DKIM 1.20230212 (Debian 12) knows rsa-sha1 and rsa-sha256 only: an
# ed25519-sha256 signature comes out "invalid (unsupported algorithm
# ed25519-sha256)".
use strict;
use warnings;

use JSON::PP;
use Mail::DKIM::DNS;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my $port = shift @ARGV or die "usage: $0 DNS-PORT < message\n";

my $resolver = Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'],
    port        => $port,
    recurse     => 0,
    retry       => 2,
    udp_timeout => 5,
    tcp_timeout => 5,
);
Mail::DKIM::DNS::resolver($resolver);

binmode STDIN;
my $dkim = Mail::DKIM::Verifier->new();
while (my $line = <STDIN>) {
    $line =~ s/\015?\012\z//;
    $dkim->PRINT("$line\015\012");
}
$dkim->CLOSE();

my @signatures = map {
    {
        result    => scalar $_->result,
        detail    => scalar $_->result_detail,
        domain    => scalar $_->domain,
        selector  => scalar $_->selector,
        algorithm => scalar $_->algorithm,
    }
} $dkim->signatures;

print JSON::PP->new->canonical->encode({
    result     => scalar $dkim->result,
    detail     => scalar $dkim->result_detail,
    signatures => \@signatures,
}), "\n";
